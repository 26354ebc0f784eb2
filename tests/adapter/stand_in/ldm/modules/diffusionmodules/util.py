"""Stand-in ``ldm.modules.diffusionmodules.util``: layer factories, gradient checkpointing and the timestep
embedding, with ldm's names and signatures."""
import math

import torch
import torch.utils.checkpoint
from torch import nn


def checkpoint(func, inputs, params, flag):
    """``func(*inputs)``, recomputed in the backward pass when ``flag`` (ldm's gradient checkpointing; only
    meaningful with autograd on, which inference never has)."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding of (N,) (possibly fractional) timesteps: ``[cos(t f_k), sin(t f_k)]`` with
    ``f_k = max_period^(-k / (dim/2))``; ``repeat_only`` repeats ``t`` instead."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero the parameters of ``module`` (the initialisation of output convolutions) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)
