"""Stand-in of Forge's ``backend/sampling/condition.py``: the conditions ``calc_cond_uncond_batch`` batches.

``ConditionCrossAttn`` concatenates contexts of different token counts when the least common multiple is at most 4x
the shorter (each is repeated up to it), otherwise the chunks run as separate U-Net calls (forge-integration §5.3).
"""
import math

import torch


def _to_batch(tensor, batch_size):
    if tensor.shape[0] == batch_size:
        return tensor
    repeats = math.ceil(batch_size / tensor.shape[0])
    return tensor.repeat([repeats] + [1] * (tensor.dim() - 1))[:batch_size]


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        return type(self)(_to_batch(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        if a[0] != b[0] or a[2] != b[2]:
            return False
        lcm = a[1] * b[1] // math.gcd(a[1], b[1])
        return lcm // min(a[1], b[1]) <= 4

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = 1
        for c in conds:
            length = length * c.shape[1] // math.gcd(length, c.shape[1])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def compile_conditions(cond):
    if cond is None:
        return None
    return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]


def compile_weighted_conditions(cond, weights):
    results = []
    for part in map(list, zip(*weights)):
        indices = [i for i, _ in part]
        entry = compile_conditions(cond[indices])
        entry[0]["strength"] = part[-1][1]
        results += entry
    return results
