"""The enhance modes' processors (method-enhance §3.2-§3.6): split cross-attention, split LoRA, skip warp, style.

Four behaviours, each attached through removable hooks and driven by the per-call plan (:class:`UNetCall` fields
``mask``, ``mask_threshold``, ``split``, ``hs_bg``, ``style_modulations``):

* :class:`SplitCrossAttention` (every ``attn2``) -- when the call has a :class:`SplitAttention`, the context
  ``[K_f ; K_b]`` is halved: the module's own call (its own kernel) is the background pass over ``K_b``, its
  forward hook runs the foreground pass ``module.forward(x, context=K_f)``, and the two are selected per query
  token by the block's mask ``m_ℓ`` (§3.3). β_b / β_f multiply each pass before ``to_out[0]`` (a pre-hook there,
  like the cross-attention scale ``s_ℓ``). ``to_out`` is affine and the merge ``(1 − μ)·o_f + μ·o_b`` and the
  selection are convex combinations of the two passes, so they are taken on ``to_out``'s outputs: equal to the
  original's ``to_out((1 − μ)·o_f + μ·o_b | o_b)``. Tie rule (Q8): LoRA layers ``o_f where m_ℓ > τ_s else o_b``,
  plain layers ``o_b where m_ℓ < τ_s else o_f``.
* :class:`SplitLoRAHooks` (``attn2.to_q/to_k/to_v`` of the layers that have LoRA) -- adds ``U_side(D_side(x))``
  to the base linear's output for the side the split attention chose for the current pass (none outside a split
  call: a default-mode run never sees a LoRA, method-enhance Q4).
* :class:`SkipWarp` (``output_blocks[j]`` pre-hook, v2 BG) -- replaces the skip part ``k_j`` of the concatenated
  input by ``k_j where c_j > τ_s else Warp_j(k_j, hs_bg[j])`` (§3.6 step 2).
* :class:`StyleModulation` (``output_blocks[j]`` forward hook, v2 style) -- ``h ← h·(1 + γ) + β`` with
  ``(γ, β) = split(Z_j(LN_j(M_j + P_j(emb_t))))``, ``emb_t`` the block's own time-embedding argument (§3.6 step 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import CurrentCall, Processor, transformer_blocks

BACKGROUND, FOREGROUND = "bg", "fg"
#: How a split attention combines its two passes (:class:`SplitAttention` ``select``).
SELECTIONS = ("layer", "above", "below", "blend")


def level_size(latent_hw: Sequence[int], tokens: int) -> tuple[int, int]:
    """(H_ℓ, W_ℓ) of a U-Net level with ``tokens`` query tokens, for a latent of ``latent_hw``: the
    ``k``-th level is ``(⌈h/2^k⌉, ⌈w/2^k⌉)`` (stride-2 convolutions round up)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for k in range(8):
        size = (math.ceil(h / 2 ** k), math.ceil(w / 2 ** k))
        if size[0] * size[1] == tokens:
            return size
    raise RuntimeError(f"ColorizeDiffusion: no U-Net level of a {h}x{w} latent has {tokens} tokens")


def resized_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``bicubic(m, size)`` in float32, not clamped (method-enhance Q9), (1, 1, H, W). At the U-Net's sizes this
    is the original's ``scale_factor`` resize (the coordinate scale ``h/H`` is the same power of two)."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="bicubic", align_corners=False)


@dataclass(frozen=True)
class SplitAttention:
    """The split cross-attention of ONE U-Net call (method-enhance §3.3).

    ``foreground_strength`` β_f, ``background_strength`` β_b, ``merging_scale`` μ; ``fg_lora`` / ``bg_lora``:
    whether the LoRA layers use their fg / bg LoRA in the fg / bg pass (``use_fg_lora``/``use_bg_lora``).
    The threshold and the mask are the call's ``mask_threshold`` and ``mask``. The dicts are the call's working
    state (per block: the pass in progress, the LoRA side, the inputs kept for the foreground pass).

    ``select`` (:data:`SELECTIONS`): how the two passes combine per query token. ``layer``: the tie rule per layer
    type (above); the XL models' (method-xl §5.5, §6.1): ``above`` = ``o_f where m > τ else o_b`` (sdxl, μ = 0),
    ``below`` = ``o_b where m < τ else o_f`` (sdxl, μ > 0), ``blend`` = ``m·o_f + (1 − m)·o_b`` with the
    unthresholded mask (xlv2's soft blend).
    """

    foreground_strength: float = 1.0
    background_strength: float = 1.0
    merging_scale: float = 0.0
    fg_lora: bool = False
    bg_lora: bool = False
    select: str = "layer"
    passes: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    lora_sides: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    pending: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    level_masks: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def strength(self, side: str) -> float:
        return self.foreground_strength if side == FOREGROUND else self.background_strength

    def level_mask(self, mask: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
        """``m_ℓ`` as (1, N_ℓ, 1) float32 on ``device`` (computed once per level and call)."""
        key = (tokens, str(device))
        found = self.level_masks.get(key)
        if found is None:
            size = level_size(mask.shape[-2:], tokens)
            found = resized_mask(mask, size).to(device).flatten(2).transpose(1, 2)
            self.level_masks[key] = found
        return found


def _hidden_and_context(args, kwargs):
    x = args[0] if args else kwargs["x"]
    if "context" in kwargs:
        return x, kwargs["context"]
    return x, (args[1] if len(args) > 1 else None)


def _with_context(args, kwargs, context):
    if "context" in kwargs or len(args) < 2:
        return args, dict(kwargs, context=context)
    return (args[0], context) + tuple(args[2:]), kwargs


class SplitCrossAttention(Processor):
    """Mask-guided split cross-attention on every ``attn2`` (see the module docstring).

    ``lora_attentions``: names (in the U-Net's ``named_modules``) of the attn2 modules that have a split LoRA:
    they are the "LoRA layers" of the tie rule and take a LoRA side per pass.
    """

    def __init__(self, lora_attentions: Sequence[str] = ()):
        self.lora_attentions = frozenset(lora_attentions)

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        names = {id(module): name for name, module in unet.named_modules()}
        handles = []
        for index, block in enumerate(transformer_blocks(unet)):
            attn = block.attn2
            lora_layer = names.get(id(attn)) in self.lora_attentions
            handles.append(attn.register_forward_pre_hook(self._background_pass(index, lora_layer, current),
                                                          with_kwargs=True))
            handles.append(attn.register_forward_hook(self._foreground_pass(index, lora_layer, current),
                                                      with_kwargs=True))
            handles.append(attn.to_out[0].register_forward_pre_hook(self._pass_strength(index, current)))
        return handles

    @staticmethod
    def _background_pass(index: int, lora_layer: bool, current: CurrentCall):
        def before(module, args, kwargs):
            call = current()
            split = call.split if call is not None else None
            if split is None:
                return None
            x, context = _hidden_and_context(args, kwargs)
            if context is None or context.shape[1] % 2:
                raise RuntimeError("ColorizeDiffusion: split cross-attention needs a context of [foreground ; "
                                   f"background] tokens, got {None if context is None else context.shape[1]}")
            half = context.shape[1] // 2
            split.pending[index] = (x, context[:, :half])
            split.passes[index] = BACKGROUND
            split.lora_sides[index] = BACKGROUND if lora_layer and split.bg_lora else None
            return _with_context(args, kwargs, context[:, half:])

        return before

    @staticmethod
    def _foreground_pass(index: int, lora_layer: bool, current: CurrentCall):
        def after(module, args, kwargs, background):
            call = current()
            split = call.split if call is not None else None
            if split is None or index not in split.pending:
                return None
            x, foreground_context = split.pending.pop(index)
            split.passes[index] = FOREGROUND
            split.lora_sides[index] = FOREGROUND if lora_layer and split.fg_lora else None
            try:
                # .forward: the module's own (host) kernel, without re-entering these hooks
                foreground = module.forward(x, context=foreground_context)
            finally:
                split.passes.pop(index, None)
                split.lora_sides.pop(index, None)
            mu = float(split.merging_scale)
            if mu != 0.0:
                foreground = (1.0 - mu) * foreground + mu * background
            m = split.level_mask(call.mask, x.shape[1], x.device)
            threshold = float(call.mask_threshold)
            if split.select == "blend":
                return (m * foreground.float() + (1.0 - m) * background.float()).to(foreground.dtype)
            if split.select == "above" or (split.select == "layer" and lora_layer):
                return torch.where(m > threshold, foreground, background)
            return torch.where(m < threshold, background, foreground)

        return after

    @staticmethod
    def _pass_strength(index: int, current: CurrentCall):
        def scale(module, args):
            call = current()
            split = call.split if call is not None else None
            side = split.passes.get(index) if split is not None else None
            if side is None:
                return None
            beta = split.strength(side)
            return None if beta == 1.0 else (args[0] * beta,) + tuple(args[1:])

        return scale


class SplitLoRAHooks(Processor):
    """``y = W x + U_side(D_side(x))`` on the attn2 q/k/v linears that have a split LoRA, for the side the split
    attention set for the pass in progress (nothing otherwise). The LoRA stays separate low-rank tensors."""

    def __init__(self, loras: Mapping[str, nn.Module]):
        self.loras = dict(loras)

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        modules = dict(unet.named_modules())
        missing = [name for name in self.loras if name not in modules]
        if missing:
            raise ValueError(f"ColorizeDiffusion: the U-Net has no {missing[0]} for its LoRA")
        index_of = {id(block.attn2): i for i, block in enumerate(transformer_blocks(unet))}
        handles = []
        for name, lora in self.loras.items():
            attn = modules[name]
            index = index_of[id(attn)]
            for proj, split_lora in lora.projections.items():
                linear = getattr(attn, proj)
                handles.append(linear.register_forward_hook(self._hook(index, split_lora, current)))
        return handles

    @staticmethod
    def _hook(index: int, lora: nn.Module, current: CurrentCall):
        def add_low_rank(module, inputs, output):
            call = current()
            split = call.split if call is not None else None
            side = split.lora_sides.get(index) if split is not None else None
            if side is None:
                return None
            x = inputs[0]
            weight = lora.sides[side].down.weight
            if weight.device != x.device:
                lora.to(x.device)
            return output + lora.delta(x, side).to(output.dtype)

        return add_low_rank


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else t.expand(rows, *t.shape[1:])


class _PerDecoderBlock(Processor):
    """One module per decoder block (``output_blocks[j]``), each a pre-hook (``pre_hook``) or a forward hook
    (with kwargs) made by the subclass's ``_hook(j, module, current)``."""

    what = "modules"
    pre_hook = True

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        blocks = unet.output_blocks
        if len(blocks) != len(self.modules):
            raise ValueError(f"ColorizeDiffusion: {len(self.modules)} {self.what} for {len(blocks)} decoder blocks")
        handles = []
        for j, (block, module) in enumerate(zip(blocks, self.modules)):
            register = block.register_forward_pre_hook if self.pre_hook else block.register_forward_hook
            handles.append(register(self._hook(j, module, current), with_kwargs=True))
        return handles


class SkipWarp(_PerDecoderBlock):
    """v2 BG enhance: the skip ``k_j`` of decoder block j becomes ``k_j where c_j > τ_s else Warp_j(k_j, hs_bg[j])``
    (a pre-hook on ``output_blocks[j]`` writes it into the skip part of its concatenated input)."""

    what = "warp modules"

    @staticmethod
    def _hook(j: int, warp: nn.Module, current: CurrentCall):
        def warp_skip(module, args, kwargs):
            call = current()
            if call is None or call.mask is None or call.hs_bg is None:
                return None
            h = args[0] if args else kwargs["x"]
            width = warp.channels
            skip = h[:, -width:]
            if warp.norm1.weight.device != h.device:
                warp.to(h.device)
            tokens = _rows(call.hs_bg[j].to(device=h.device, dtype=skip.dtype), h.shape[0])
            warped = warp(skip, tokens)
            c = resized_mask(call.mask, skip.shape[-2:]).to(h.device)
            # in place: ``h`` is the concatenation the U-Net made for this block alone (ldm: cat([h, hs.pop()]))
            h[:, -width:] = torch.where(c > float(call.mask_threshold), skip, warped.to(skip.dtype))
            return None

        return warp_skip


class StyleModulation(_PerDecoderBlock):
    """v2 style enhance: ``h ← h·(1 + γ_j) + β_j`` after decoder block j (forward hook on ``output_blocks[j]``)."""

    what = "style modules"
    pre_hook = False

    @staticmethod
    def _hook(j: int, style: nn.Module, current: CurrentCall):
        def modulate(module, args, kwargs, output):
            call = current()
            if call is None or call.style_modulations is None:
                return None
            emb = args[1] if len(args) > 1 else kwargs["emb"]
            if style[0].weight.device != output.device:
                style.to(output.device)
            gamma, beta = style.scale_shift(call.style_modulations[j].to(emb.device), emb)
            return output * (1 + gamma.to(output.dtype)) + beta.to(output.dtype)

        return modulate
