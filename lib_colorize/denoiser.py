"""The dual-guidance denoiser call over a hooked U-Net (method §5, §6.2), shared by every host.

A host (the host-free pipeline, or the webui's ``CFGDenoiser``) gives :func:`guided_call` three things:

* ``inner_model(x_in, sigma_in, context) -> output``: one batched evaluation of its model wrapper
  (k-diffusion denoiser returning x0, or a timestep model returning eps);
* ``t``: the U-Net timestep of this call (fractional under k-diffusion), for the guidance window and the
  injection start, both defined on the progress ``τ = 1 - t/999``;
* ``noised_reference(latent, sigma, noise)``: the reference latent brought to this call's noise level in the
  host's input space (k-diffusion: ``r + σ ε``; timestep samplers: ``√ᾱ_t r + √(1-ᾱ_t) ε``).

The call builds the rows ``[c | u_ref | u_sketch]`` of the active guidance mode with their contexts and
sketch hints, runs the attention-injection write pass when due, evaluates the model (one call, or one per
role when the host does not batch cond and uncond together), and combines the outputs.

**Cheaper attention injection** (issue 6; same result as method §6.2). The original runs the reference pass on
all ``B = rows × bs`` rows, but those rows share the reference latent, the noise ``ε``, the timestep and the
hints, and differ only by context: the reference tokens (rows ``c`` and ``u_sketch``) or zeros (rows
``u_ref``); outside the guidance window every row has the same one-token zero context. We therefore run only
the distinct rows (one or two) and let each main row read the bank row of its context
(``bank_index``). ``InjectionPlan.full_batch=True`` keeps the original full-batch pass for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .guidance import (COND, REF_DROPPED, SKETCH_DROPPED, GuidanceMode, combine, progress,
                       reference_window_open, row_roles, split_rows)
from .hooks import READ, WRITE, ColorizeHooks, WritePassDone

InnerModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoisedReference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class InjectionPlan:
    """Attention injection inputs prepared once per generation (method §6.1)."""

    reference_latent: torch.Tensor            # r = 0.18215 · VAE(reference resized to (H, W)).sample(), (1,4,h,w)
    hints: Optional[list]                     # hints of the negated reference × κ; None when κ = 0
    reference_fidelity: float = 0.5           # φ
    start: float = 0.0                        # τ₀: no injection while τ < τ₀
    noise_generator: Optional[torch.Generator] = None  # CPU generator for the per-call ε (reproducible)
    full_batch: bool = False                  # run the original's full-batch reference pass (benchmarks)


@dataclass
class GenerationPlan:
    """Everything a denoiser call needs, prepared once per generation (and per hires pass)."""

    mode: GuidanceMode
    reference_guidance: float
    sketch_guidance: float
    reference_tokens: torch.Tensor            # (1, N, D) local tokens after manipulation, or zeros
    sketch_hints: list                        # 5 × (1, C, h, w), already × sketch strength
    blank_hints: list                         # hints of the blank (-1) sketch, × sketch strength
    window: tuple = (0.0, 1.0, -0.05, -0.05)  # guidance start, end, no-guidance start, end
    injection: Optional[InjectionPlan] = None
    stats: dict = field(default_factory=lambda: {"unet_calls": 0, "unet_rows": 0, "write_rows": 0})

    @property
    def roles(self) -> tuple:
        return row_roles(self.mode)


def row_contexts(plan: GenerationPlan, roles: Sequence[str], batch: int, window_open: bool) -> torch.Tensor:
    """Context rows ``[role0 × bs, role1 × bs, ...]`` (method §5.1, §5.4)."""
    tokens = plan.reference_tokens
    if not window_open:
        # outside the window: ONE zero token for all rows (method §5.4)
        return tokens.new_zeros(batch * len(roles), 1, tokens.shape[-1])
    zeros = torch.zeros_like(tokens)
    per_role = {COND: tokens, REF_DROPPED: zeros, SKETCH_DROPPED: tokens}
    return torch.cat([per_role[r].expand(batch, -1, -1) for r in roles], dim=0)


def row_hints(plan: GenerationPlan, roles: Sequence[str], batch: int) -> list:
    """Hint rows per level: the sketch's for ``c``/``u_ref``, the blank sketch's for ``u_sketch``."""
    levels = []
    for sketch, blank in zip(plan.sketch_hints, plan.blank_hints):
        parts = [(blank if r == SKETCH_DROPPED else sketch).expand(batch, -1, -1, -1) for r in roles]
        levels.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
    return levels


def _write_pass_contexts(plan: GenerationPlan, roles: Sequence[str], batch: int, window_open: bool):
    """Contexts of the reference (write) pass and, for each main row, the write row it reads.

    Distinct form: at most two rows (reference tokens, zeros); full form: the main rows themselves.
    """
    if plan.injection.full_batch:
        return row_contexts(plan, roles, batch, window_open), None
    if not window_open:
        return plan.reference_tokens.new_zeros(1, 1, plan.reference_tokens.shape[-1]), \
            torch.zeros(batch * len(roles), dtype=torch.long)
    kinds = ["zeros" if r == REF_DROPPED else "tokens" for r in roles]
    distinct = list(dict.fromkeys(kinds))
    contexts = {"tokens": plan.reference_tokens, "zeros": torch.zeros_like(plan.reference_tokens)}
    write_context = torch.cat([contexts[k] for k in distinct], dim=0)
    bank_index = torch.tensor([distinct.index(k) for k in kinds for _ in range(batch)], dtype=torch.long)
    return write_context, bank_index


def _write_pass(plan, hooks, inner_model, noised_reference, sigma, roles, batch, window_open):
    inj = plan.injection
    write_context, bank_index = _write_pass_contexts(plan, roles, batch, window_open)
    rows = write_context.shape[0]
    latent = inj.reference_latent
    noise = torch.randn(latent.shape, generator=inj.noise_generator, dtype=torch.float32)
    noise = noise.to(device=latent.device, dtype=latent.dtype)   # the same ε for every row (method §6.2)
    sigma0 = sigma.reshape(-1)[:1]
    x_ref = noised_reference(latent, sigma0, noise).expand(rows, -1, -1, -1)
    hooks.set_call(inj.hints, injection_mode=WRITE)
    try:
        inner_model(x_ref, sigma0.expand(rows), write_context)   # output discarded: only the bank matters
    except WritePassDone:
        pass   # the last attn1 has written the bank; the rest of the U-Net was skipped (hooks.stop_write_early)
    finally:
        hooks.row_hints = None
    plan.stats["write_rows"] += rows
    return bank_index


@torch.no_grad()
def guided_call(plan: GenerationPlan, hooks: ColorizeHooks, inner_model: InnerModel, x: torch.Tensor,
                sigma: torch.Tensor, t: "float | torch.Tensor", noised_reference: Optional[NoisedReference] = None,
                batch_together: bool = True) -> torch.Tensor:
    """One guided denoiser evaluation ``D(x, σ)`` with ColorizeDiffusion's dual guidance (method §5.3).

    ``x``: (bs, 4, h, w) in the host's space; ``sigma``: (bs,) or scalar. Returns (bs, 4, h, w) combined.
    """
    batch = x.shape[0]
    roles = plan.roles
    sigma = sigma.reshape(-1).expand(batch) if sigma.numel() in (1, batch) else sigma
    tau = progress(t)
    window_open = reference_window_open(tau, *plan.window)
    inj = plan.injection
    inject = inj is not None and tau >= inj.start
    all_roles = roles
    if (not window_open and COND in roles and REF_DROPPED in roles
            and not (inject and inj.reference_fidelity > 1e-5)):
        # outside the window the reference-dropped rows have the cond rows' inputs (x, sketch hints, the one-token
        # zero context, the same bank row) and so their output: evaluate them once (method §5.4: D_c = D_u0)
        roles = tuple(r for r in roles if r != REF_DROPPED)
    contexts = row_contexts(plan, roles, batch, window_open)
    hints = row_hints(plan, roles, batch)
    try:
        bank_index = None
        if inject:
            if noised_reference is None:
                raise ValueError("attention injection needs noised_reference")
            bank_index = _write_pass(plan, hooks, inner_model, noised_reference, sigma, roles, batch, window_open)
        groups = [tuple(roles)] if batch_together else [(r,) for r in roles]
        outputs = []
        for group in groups:
            first = roles.index(group[0]) * batch
            rows = slice(first, first + batch * len(group))
            fidelity_rows = None
            if inject and REF_DROPPED in group:
                start = group.index(REF_DROPPED) * batch
                fidelity_rows = torch.arange(start, start + batch)
            group_bank = bank_index[rows] if bank_index is not None else None
            if inject and bank_index is None and len(groups) > 1:
                group_bank = torch.arange(rows.start, rows.stop)   # full-batch bank, this call's rows
            hooks.set_call([h[rows] for h in hints], injection_mode=READ if inject else None,
                           bank_index=group_bank, fidelity_rows=fidelity_rows,
                           reference_fidelity=inj.reference_fidelity if inject else 0.0,
                           keep_bank=group is not groups[-1])
            x_in = x.repeat(len(group), 1, 1, 1)
            sigma_in = sigma.repeat(len(group))
            outputs.append(inner_model(x_in, sigma_in, contexts[rows]))
            plan.stats["unet_calls"] += 1
            plan.stats["unet_rows"] += x_in.shape[0]
        output = torch.cat(outputs, dim=0)
    finally:
        hooks.clear_call()
    outputs_by_role = split_rows(output, roles)
    if REF_DROPPED in all_roles and REF_DROPPED not in roles:
        outputs_by_role[REF_DROPPED] = outputs_by_role[COND]
    return combine(outputs_by_role, plan.mode, plan.reference_guidance, plan.sketch_guidance)

