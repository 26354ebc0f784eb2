"""The dual-guidance denoiser call over a U-Net with the generation's processors (method §5, §6.2), for every host.

A host (the host-free pipeline, the webui's ``CFGDenoiser``, Forge's model function wrapper) gives
:func:`guided_call` (or :func:`evaluate_rows`, when the host combines the rows itself) three things:

* ``inner_model(x_in, sigma_in, context) -> output``: one batched evaluation of its model wrapper
  (k-diffusion denoiser returning x0, or a timestep model returning eps); for the XL models
  ``inner_model(x_in, sigma_in, context, y)``, with the plan's ``y`` on every row (method-xl §2.2, §5.1). The
  rows of a call belong to one image
  of the batch; a model that needs that image's own inputs besides ``x`` (the webui's ``image_cond``) has a method
  ``for_image(i)`` that returns the model of image ``i``;
* ``t``: the U-Net timestep of this call (fractional under k-diffusion), for the guidance window and the
  injection start, both defined on the progress ``τ = 1 - t/999``;
* ``noised_reference(latent, sigma, noise)``: the reference latent brought to this call's noise level in the
  host's input space, the original's ``q(r, round(t))`` (k-diffusion inputs: :func:`k_noised_reference`; timestep
  samplers: ``√ᾱ_t r + √(1-ᾱ_t) ε``).

The call builds the rows ``[c | u_ref | u_sketch]`` of the active guidance mode with their contexts and sketch
hints, runs the attention-injection reference pass when due, evaluates the model (one call, or one per role when
the host does not batch cond and uncond together), each inside a :class:`~lib_colorize.processors.UNetCall`, and
combines the outputs.

**The reference pass runs only the rows that differ** (same result as method §6.2). The original runs it on all
``B = rows × bs`` rows, but an image's rows share its reference latent, its noise ``ε``, the timestep and the hints,
and differ only by context: the reference tokens (rows ``c`` and ``u_sketch``) or zeros (rows ``u_ref``); outside
the guidance window every row has the same one-token zero context. So only the distinct rows (one or two per image)
are run, and each main row reads the bank row of its context (``BankRead.bank_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .guidance import (COND, REF_DROPPED, SKETCH_DROPPED, GuidanceMode, GuidanceWindow, combine, progress,
                       row_roles, split_rows)
from .processors import BankRead, BankWrite, ProcessorSet, ReferenceBank, UNetCall, WritePassDone
from .processors.injection import MIN_FIDELITY
from . import schedule

InnerModel = Callable[..., torch.Tensor]
NoisedReference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def k_noised_reference(sigmas: torch.Tensor, sigma_to_t: Callable[[torch.Tensor], torch.Tensor]) -> NoisedReference:
    """The injection pass's input for a host whose model takes k-diffusion inputs (method §6.2): the original's
    ``q(r, round(t))`` as the input that the model's ``c_in`` turns into it
    (:func:`lib_colorize.schedule.noised_reference`; ``r + σ ε`` at integer timesteps). ``sigmas`` is the model's
    discrete table, ``sigma_to_t`` its timestep of a sigma."""
    def noised(latent: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return schedule.noised_reference(latent, sigma, noise, sigma_to_t(sigma), sigmas)

    return noised


@dataclass
class InjectionPlan:
    """Attention injection inputs prepared once per generation (method §6.1), one entry per image of the batch.

    Image ``i`` has its own reference-latent sample and its own generator of the per-call ε (shared by its row
    groups, method §6.2), both seeded from its seed, so it is the image a generation of it alone would give.
    """

    reference_latents: torch.Tensor          # r_i = 0.18215 · VAE(reference resized to (H, W)).sample(), (bs,4,h,w)
    hints: Optional[list]                     # hints of the negated reference × κ; None when κ = 0
    noise_generators: Sequence[torch.Generator]  # CPU generator of image i's per-call ε
    reference_fidelity: float = 0.5           # φ
    start: float = 0.0                        # τ₀: no injection while τ < τ₀


@dataclass
class GenerationPlan:
    """Everything a denoiser call needs, prepared once per generation (and per hires pass)."""

    mode: GuidanceMode
    reference_guidance: float
    sketch_guidance: float
    reference_tokens: torch.Tensor            # (1, N, D) local tokens after manipulation, or zeros
    sketch_hints: list                        # 5 × (1, C, h, w), already × sketch strength
    blank_hints: list                         # hints of the blank (-1) sketch, × sketch strength
    window: GuidanceWindow = GuidanceWindow()
    injection: Optional[InjectionPlan] = None
    vector: Optional[torch.Tensor] = None     # XL: y (1, 512), the same for every row and call; None for SD2.1
    #: the enhance modes' per-call inputs (:class:`lib_colorize.enhance.EnhancePlan`); ``reference_tokens`` is
    #: then their context ``[fg ; bg]``
    enhance: Optional[object] = None
    stats: dict = field(default_factory=lambda: {"unet_calls": 0, "unet_rows": 0, "write_rows": 0})

    @property
    def roles(self) -> tuple:
        return row_roles(self.mode)

    def call_fields(self, image: int, window_open: bool) -> dict:
        """The enhance fields of a :class:`UNetCall` of image ``image`` (none without enhance modes)."""
        return self.enhance.call_fields(image, window_open) if self.enhance is not None else {}


def evaluate(plan: GenerationPlan, model: InnerModel, x: torch.Tensor, sigma: torch.Tensor,
             context: torch.Tensor) -> torch.Tensor:
    """One model call on rows ``x`` with their contexts, and the plan's ``y`` on every row when it has one."""
    if plan.vector is None:
        return model(x, sigma, context)
    return model(x, sigma, context, plan.vector.to(x.device).expand(x.shape[0], -1))


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


def reference_pass_rows(plan: GenerationPlan, roles: Sequence[str],
                        window_open: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct contexts of one image's reference pass (at most two rows: reference tokens, zeros) and, for each
    of its main rows, the reference-pass row whose bank it reads."""
    tokens = plan.reference_tokens
    if not window_open:
        return tokens.new_zeros(1, 1, tokens.shape[-1]), torch.zeros(len(roles), dtype=torch.long)
    kinds = ["zeros" if r == REF_DROPPED else "tokens" for r in roles]
    distinct = list(dict.fromkeys(kinds))
    contexts = {"tokens": tokens, "zeros": torch.zeros_like(tokens)}
    bank_rows = torch.tensor([distinct.index(k) for k in kinds], dtype=torch.long)
    return torch.cat([contexts[k] for k in distinct], dim=0), bank_rows


def reference_pass(plan: GenerationPlan, processors: ProcessorSet, model: InnerModel,
                   noised_reference: NoisedReference, sigma: torch.Tensor, roles: Sequence[str], image: int,
                   window_open: bool) -> tuple[ReferenceBank, torch.Tensor]:
    """The injection's reference pass of one image (method §6.2): its noised reference latent through the U-Net,
    the ``attn1`` inputs into a new bank. Returns the bank and the bank row of each of the image's main rows."""
    inj = plan.injection
    context, bank_rows = reference_pass_rows(plan, roles, window_open)
    rows = context.shape[0]
    latent = inj.reference_latents[image:image + 1]
    noise = torch.randn(latent.shape, generator=inj.noise_generators[image], dtype=torch.float32)
    noise = noise.to(device=latent.device, dtype=latent.dtype)   # one ε for all of the image's rows (method §6.2)
    sigma0 = sigma.reshape(-1)[:1]
    x_ref = noised_reference(latent, sigma0, noise).expand(rows, -1, -1, -1)
    bank = ReferenceBank()
    # the original's reference pass gets the main pass's keyword inputs: mask, hs_bg, style (method §6.2)
    with processors.call(UNetCall(sketch_hints=inj.hints, bank=BankWrite(bank),
                                  **plan.call_fields(image, window_open))):
        try:
            evaluate(plan, model, x_ref, sigma0.expand(rows), context)   # output discarded: only the bank
        except WritePassDone:
            pass   # the last attn1 has written the bank; the rest of the U-Net was skipped
    plan.stats["write_rows"] += rows
    return bank, bank_rows


def evaluated_roles(plan: GenerationPlan, window_open: bool, injecting: bool) -> tuple:
    """The row groups that need a U-Net evaluation. Outside the window the reference-dropped rows have the cond
    rows' inputs (x, sketch hints, the one-token zero context, the same bank row) and so their output (method §5.4:
    ``D_c = D_u0``), unless injection blends them differently."""
    roles = plan.roles
    blends = injecting and plan.injection.reference_fidelity > MIN_FIDELITY
    if not window_open and COND in roles and REF_DROPPED in roles and not blends:
        return tuple(r for r in roles if r != REF_DROPPED)
    return roles


def image_rows(plan: GenerationPlan, processors: ProcessorSet, inner_model: InnerModel, x: torch.Tensor,
               sigma: torch.Tensor, roles: Sequence[str], contexts: torch.Tensor, hints: list,
               bank: Optional[ReferenceBank], bank_rows: Optional[torch.Tensor], batch_together: bool,
               image: int = 0, window_open: bool = True) -> torch.Tensor:
    """The outputs of one image's row groups ``[role0, role1, ...]``: one U-Net call, or one per role."""
    outputs = []
    for group in [tuple(roles)] if batch_together else [(r,) for r in roles]:
        first = roles.index(group[0])
        rows = slice(first, first + len(group))
        read = None
        if bank is not None:
            blended = range(group.index(REF_DROPPED), group.index(REF_DROPPED) + 1) if REF_DROPPED in group \
                else range(0)
            read = BankRead(bank, rows=len(group), bank_rows=bank_rows[rows], blended=blended,
                            reference_fidelity=plan.injection.reference_fidelity, device=x.device)
        with processors.call(UNetCall(sketch_hints=[h[rows] for h in hints], bank=read,
                                      **plan.call_fields(image, window_open))):
            outputs.append(evaluate(plan, inner_model, x.repeat(len(group), 1, 1, 1), sigma.repeat(len(group)),
                                    contexts[rows]))
        plan.stats["unet_calls"] += 1
        plan.stats["unet_rows"] += len(group)
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


@torch.no_grad()
def evaluate_rows(plan: GenerationPlan, processors: ProcessorSet, inner_model: InnerModel, x: torch.Tensor,
                  sigma: torch.Tensor, t: "float | torch.Tensor", noised_reference: Optional[NoisedReference] = None,
                  batch_together: bool = True) -> tuple[tuple, torch.Tensor]:
    """The U-Net outputs of one denoiser evaluation, before guidance: ``(roles, outputs)`` with ``outputs`` the
    rows ``[role0 × bs, role1 × bs, ...]`` of the row groups that needed an evaluation (:func:`evaluated_roles`).

    ``x``: (bs, 4, h, w) in the host's space; ``sigma``: (bs,) or scalar. Each image of the batch is evaluated on
    its own, with the shapes of a generation of that image alone: the same kernels then give it bit for bit,
    whatever the batch (the row groups of one image stay in one call). The injection's reference pass runs first
    when due.
    """
    batch = x.shape[0]
    sigma = sigma.reshape(-1).expand(batch) if sigma.numel() in (1, batch) else sigma
    tau = progress(t)
    window_open = plan.window.is_open(tau)
    inj = plan.injection
    inject = inj is not None and tau >= inj.start
    if inject and noised_reference is None:
        raise ValueError("attention injection needs noised_reference")
    roles = evaluated_roles(plan, window_open, inject)
    contexts = row_contexts(plan, roles, 1, window_open)
    hints = row_hints(plan, roles, 1)
    per_image = []
    for image in range(batch):
        model = inner_model.for_image(image) if hasattr(inner_model, "for_image") else inner_model
        bank = bank_rows = None
        if inject:
            bank, bank_rows = reference_pass(plan, processors, model, noised_reference, sigma[image:image + 1],
                                             roles, image, window_open)
            bank_rows = bank_rows.to(x.device)
        per_image.append(image_rows(plan, processors, model, x[image:image + 1], sigma[image:image + 1],
                                    roles, contexts, hints, bank, bank_rows, batch_together, image, window_open))
    outputs = torch.stack(per_image, dim=1).flatten(0, 1) if batch > 1 else per_image[0]
    return roles, outputs


def outputs_by_role(plan: GenerationPlan, roles: Sequence[str], outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`evaluate_rows`' outputs split by role, with every role of the plan's mode present (the
    reference-dropped rows that were not evaluated are the cond rows, :func:`evaluated_roles`)."""
    by_role = split_rows(outputs, roles)
    if REF_DROPPED in plan.roles and REF_DROPPED not in roles:
        by_role[REF_DROPPED] = by_role[COND]
    return by_role


@torch.no_grad()
def guided_call(plan: GenerationPlan, processors: ProcessorSet, inner_model: InnerModel, x: torch.Tensor,
                sigma: torch.Tensor, t: "float | torch.Tensor", noised_reference: Optional[NoisedReference] = None,
                batch_together: bool = True,
                observe: Optional[Callable[[torch.Tensor], None]] = None,
                outputs_out: Optional[dict] = None) -> torch.Tensor:
    """One guided denoiser evaluation ``D(x, σ)`` with ColorizeDiffusion's dual guidance (method §5.3):
    :func:`evaluate_rows`, then :func:`~lib_colorize.guidance.combine`. Returns (bs, 4, h, w).

    ``observe`` sees the main rows' outputs ``[role0 × bs, role1 × bs, ...]`` (not the injection's reference
    pass) before they are combined; in-place edits count. ``outputs_out``, when given, receives the outputs by
    role (:func:`outputs_by_role`), e.g. for a host's preview.
    """
    roles, outputs = evaluate_rows(plan, processors, inner_model, x, sigma, t, noised_reference, batch_together)
    if observe is not None:
        observe(outputs)
    by_role = outputs_by_role(plan, roles, outputs)
    if outputs_out is not None:
        outputs_out.update(by_role)
    return combine(by_role, plan.mode, plan.reference_guidance, plan.sketch_guidance)
