"""The original's attention injection (method §6.2-§6.3), restated for the benchmark and the parity tests.

The library's injection gives the same result for less work (:mod:`lib_colorize.processors.injection`); this is
the algorithm it is measured and checked against:

* the reference pass runs on all ``B = rows × bs`` rows with the main pass's contexts, through the whole U-Net,
  with one reference latent and one ``ε`` for the whole batch;
* every transformer block's self-attention then attends to ``[own ; bank row i]`` for row ``i``, and the
  reference-dropped rows compute their plain self-attention separately and blend it in by ``φ``;
* every row group is evaluated, also outside the guidance window, and the whole batch in one call.

It runs on the same processor mechanism (sketch hints and cross-attention scales are the library's processors),
so the two differ only in the injection.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lib_colorize.denoiser import GenerationPlan, row_contexts, row_hints
from lib_colorize.guidance import REF_DROPPED, combine, progress, split_rows
from lib_colorize.pipeline import Colorizer
from lib_colorize.processors import (CrossAttentionScale, Processor, ProcessorSet, SketchHints, UNetCall,
                                     transformer_blocks)


@dataclass(frozen=True)
class OriginalWrite:
    bank: dict


@dataclass(frozen=True)
class OriginalRead:
    bank: dict
    reference_dropped_rows: Optional[torch.Tensor]   # ``gr_indice``
    reference_fidelity: float
    pending: dict = field(default_factory=dict, compare=False)


class OriginalInjection(Processor):
    """§6.3's hacked block as ``attn1`` hooks: WRITE records ``n = norm1(x)`` and runs plain self-attention; READ
    attends to ``[n ; bank]`` and, for the ``gr`` rows, recomputes plain self-attention and blends by ``φ``."""

    def attach(self, unet: nn.Module, current):
        handles = []
        for index, block in enumerate(transformer_blocks(unet)):
            handles.append(block.attn1.register_forward_pre_hook(self._pre(index, current), with_kwargs=True))
            handles.append(block.attn1.register_forward_hook(self._post(index, current), with_kwargs=True))
        return handles

    @staticmethod
    def _pre(index, current):
        def hook(module, args, kwargs):
            call = current()
            step = call.bank if call is not None else None
            n = args[0] if args else kwargs["x"]
            if isinstance(step, OriginalWrite):
                step.bank[index] = n
            elif isinstance(step, OriginalRead) and index in step.bank:
                step.pending[index] = n
                return args, dict(kwargs, context=torch.cat([n, step.bank[index].to(n.dtype)], dim=1))
            return None
        return hook

    @staticmethod
    def _post(index, current):
        def hook(module, args, kwargs, output):
            call = current()
            step = call.bank if call is not None else None
            if not isinstance(step, OriginalRead):
                return None
            n = step.pending.pop(index, None)
            rows = step.reference_dropped_rows
            if n is None or rows is None or step.reference_fidelity <= 1e-5:
                return None
            phi = step.reference_fidelity
            plain = module.forward(n[rows], context=None)
            blended = output.clone()
            blended[rows] = phi * plain + (1 - phi) * output[rows]
            return blended
        return hook


def original_processors(unet: nn.Module, layer_scales=None, injection: bool = False) -> ProcessorSet:
    processors = [SketchHints()]
    if layer_scales is not None:
        processors.append(CrossAttentionScale(layer_scales))
    if injection:
        processors.append(OriginalInjection())
    return ProcessorSet(unet, processors)


@torch.no_grad()
def original_guided_call(plan: GenerationPlan, processors: ProcessorSet, inner_model, x, sigma, t,
                         noised_reference=None, batch_together: bool = True) -> torch.Tensor:
    """One guided denoiser call the original's way (method §5.3, §6.2): every row group, and the full-batch
    reference pass with the same ε for every row."""
    batch = x.shape[0]
    sigma = sigma.reshape(-1).expand(batch) if sigma.numel() in (1, batch) else sigma
    roles = plan.roles
    tau = progress(t)
    window_open = plan.window.is_open(tau)
    contexts = row_contexts(plan, roles, batch, window_open)
    hints = row_hints(plan, roles, batch)
    inj = plan.injection
    bank = None
    if inj is not None and tau >= inj.start:
        # the original draws one reference latent and one ε for the whole batch: image 0's
        rows = batch * len(roles)
        latent = inj.reference_latents[:1]
        noise = torch.randn(latent.shape, generator=inj.noise_generators[0], dtype=torch.float32).to(latent)
        x_ref = noised_reference(latent, sigma[:1], noise).expand(rows, -1, -1, -1)
        bank = {}
        ref_hints = [h.expand(rows, -1, -1, -1) for h in inj.hints] if inj.hints is not None else None
        with processors.call(UNetCall(sketch_hints=ref_hints, bank=OriginalWrite(bank))):
            inner_model(x_ref, sigma[:1].expand(rows), contexts)
        plan.stats["write_rows"] += rows
    outputs = []
    for group in [tuple(roles)] if batch_together else [(r,) for r in roles]:
        first = roles.index(group[0]) * batch
        rows = slice(first, first + batch * len(group))
        step = None
        if bank is not None:
            gr = None
            if REF_DROPPED in group:
                start = group.index(REF_DROPPED) * batch
                gr = torch.arange(start, start + batch, device=x.device)
            step = OriginalRead({i: b[rows] for i, b in bank.items()}, gr, inj.reference_fidelity)
        with processors.call(UNetCall(sketch_hints=[h[rows] for h in hints], bank=step)):
            outputs.append(inner_model(x.repeat(len(group), 1, 1, 1), sigma.repeat(len(group)), contexts[rows]))
        plan.stats["unet_calls"] += 1
        plan.stats["unet_rows"] += batch * len(group)
    return combine(split_rows(torch.cat(outputs), roles), plan.mode, plan.reference_guidance, plan.sketch_guidance)


class OriginalColorizer(Colorizer):
    """The host-free pipeline with the original's injection (everything else is the library's)."""

    def processors_for(self, layer_scales, injection: bool, enhance=None) -> ProcessorSet:
        if enhance is not None:
            raise NotImplementedError("the original's injection is compared in the default mode only")
        return original_processors(self.unet, layer_scales, injection)

    def denoise(self, plan, processors, inner_model, x, sigma, t, noised_reference) -> torch.Tensor:
        return original_guided_call(plan, processors, inner_model, x, sigma, t, noised_reference)
