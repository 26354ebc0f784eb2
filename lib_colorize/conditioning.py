"""Per-generation conditioning: sketch hints, reference tokens, the injection latent, and the plan.

These run once per generation (the sketch encoder once more per hires pass), never per sampling step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .denoiser import GenerationPlan, InjectionPlan
from .guidance import GuidanceWindow, guidance_mode
from .models import LATENT_SCALE
from .options import ColorizeOptions

LOCAL_TOKENS = 256
#: the XL models' fixed "aesthetic score" (method-xl §2.2: the training configs' score key, 7 at inference)
XL_AESTHETIC_SCORE = 7.0


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def encode_sketch_hints(sketch_encoder: torch.nn.Module, sketch: torch.Tensor, strength: float,
                        injection_reference: Optional[torch.Tensor] = None,
                        injection_sketch_fidelity: float = 0.0, stats: Optional[dict] = None,
                        level_strengths: Optional[Sequence[float]] = None):
    """Hints of the sketch, of the blank sketch and (injection) of the negated reference, in ONE encoder call.

    ``sketch``: (1,3,H,W) in the sketch domain. The unconditional sketch is ``-1`` everywhere (a blank page,
    method §3); its hints are not zero. Sketch strength ``k_ctl`` scales both (§3); the XL models also take one
    strength per level, ``a_k = k_ctl · level_strengths[k]`` (method-xl §2.3). The injection hints are scaled by
    the sketch fidelity κ instead (§6.1) and skipped entirely when κ = 0.
    Returns ``(sketch_hints, blank_hints, injection_hints | None)``, each a list of one (1,C,h,w) tensor per level
    (5 for the SD2.1 models, 4 for XL).
    """
    batch = [sketch, -torch.ones_like(sketch)]
    use_injection_hints = injection_reference is not None and injection_sketch_fidelity != 0.0
    if use_injection_hints:
        batch.append(-injection_reference.to(sketch))
    device = next(sketch_encoder.parameters()).device
    hints = sketch_encoder(torch.cat(batch).to(device=device, dtype=_param_dtype(sketch_encoder)))
    if stats is not None:
        stats["sketch_encoder_calls"] = stats.get("sketch_encoder_calls", 0) + 1
    scales = [strength] * len(hints) if level_strengths is None else \
        [float(strength) * float(level) for level in level_strengths]
    if len(scales) != len(hints):
        raise ValueError(f"{len(scales)} sketch strengths for {len(hints)} sketch-encoder levels")
    sketch_hints = [h[0:1] * a for h, a in zip(hints, scales)]
    blank_hints = [h[1:2] * a for h, a in zip(hints, scales)]
    injection_hints = [h[2:3] * injection_sketch_fidelity for h in hints] if use_injection_hints else None
    return sketch_hints, blank_hints, injection_hints


def xl_vector(height: int, width: int, aesthetic_score: float = XL_AESTHETIC_SCORE) -> torch.Tensor:
    """``y = [E₂₅₆(√(H·W)) | E₂₅₆(score)]`` (1, 512) float32, H, W the generation size in pixels (method-xl §2.2);
    the same for every row of a call, never the webui's 2816-wide SDXL vector (§12 #13)."""
    from .models.unet import timestep_embedding

    scalars = torch.tensor([math.sqrt(float(height) * float(width)), float(aesthetic_score)])
    embedded = timestep_embedding(scalars, 256)
    return torch.cat([embedded[0:1], embedded[1:2]], dim=1)


@torch.no_grad()
def reference_tokens(encode_full: Callable[[torch.Tensor], torch.Tensor], reference: Optional[torch.Tensor],
                     manipulations: Sequence = (), encode_text: Optional[Callable] = None,
                     context_dim: Optional[int] = None) -> torch.Tensor:
    """Cross-attention context from the reference (method §2.3): full tokens, manipulated, cls dropped.

    ``encode_full`` maps (1,3,H,W) in [-1,1] to (1, 1+N, D) (cached per image content by the caller).
    No reference: 256 zero tokens of width ``context_dim``.
    """
    if reference is None:
        if context_dim is None:
            raise ValueError("context_dim is needed when there is no reference")
        return torch.zeros(1, LOCAL_TOKENS, context_dim)
    full = encode_full(reference)
    if manipulations:
        from .manipulation import apply_manipulations
        full = apply_manipulations(full, manipulations, encode_text)
    return full[:, 1:]


def crop_scale(height: float, width: float, background_height: float, background_width: float) -> tuple:
    """``(c_h, c_w)`` of xlv2's ReferenceNet (method-xl §6.2, the original's ``get_crop_scale``): the share of the
    background that the generation's aspect ratio covers; 1 along the side that fits."""
    if width / height > background_width / background_height:
        return (height / width) * (background_width / background_height), 1.0
    return 1.0, (width / height) * (background_height / background_width)


def reference_net_vector(height: int, width: int, background_height: int, background_width: int) -> torch.Tensor:
    """xlv2's ReferenceNet ``y_bg = [E₂₅₆(0) | E₂₅₆(0) | E₂₅₆(c_h) | E₂₅₆(c_w)]`` (1, 1024) float32 (crop top, crop
    left, then :func:`crop_scale`; method-xl §6.2)."""
    from .models.unet import timestep_embedding

    c_h, c_w = crop_scale(height, width, background_height, background_width)
    return timestep_embedding(torch.tensor([0.0, 0.0, float(c_h), float(c_w)]), 256).reshape(1, -1)


def reference_net_input(background_latent: torch.Tensor, sketch_mask: torch.Tensor,
                        reference_mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x_bg = [z_bg | m_s | m_r]`` (1, 6, h, w): the masks (1, 1, ·, ·) bicubic-resized to the generation size
    (``size`` = (H, W)) and nearest-downsampled by 8 to the latent (method-xl §6.2)."""
    def latent_mask(mask):
        full = torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="bicubic")
        return torch.nn.functional.interpolate(full, scale_factor=0.125)

    masks = [latent_mask(m).to(background_latent) for m in (sketch_mask, reference_mask)]
    return torch.cat([background_latent] + masks, dim=1)


@torch.no_grad()
def reference_net_banks(reference_net: torch.nn.Module, x_bg: torch.Tensor, y_bg: torch.Tensor):
    """xlv2's ReferenceNet pass, once per generation at timestep 0 (method-xl §6.2-6.3): the ``attn1`` inputs of its
    36 decoder blocks, the banks the U-Net's decoder reads. The ReferenceNet can be released afterwards."""
    from .processors import ProcessorSet, ReferenceNetBanks, ReferenceNetBankWrite, UNetCall

    banks = ReferenceNetBanks()
    dtype = next(reference_net.parameters()).dtype
    with ProcessorSet(reference_net, [ReferenceNetBankWrite()]) as processors, \
            processors.call(UNetCall(reference_net=banks)):
        reference_net(x_bg.to(dtype), torch.zeros(1, device=x_bg.device), None, y_bg)
    return banks


@torch.no_grad()
def xl_reference_context(encode_full: Callable[[torch.Tensor], torch.Tensor], reference: Optional[torch.Tensor],
                         context_dim: int, tokens: int = 196) -> torch.Tensor:
    """The XL models' context (method-xl §3.5): the projector's 196 tokens of the reference, (1, 196, D); no
    reference: zeros of that shape (the original's ``zeros_like`` of an embedding)."""
    if reference is None:
        return torch.zeros(1, tokens, context_dim)
    return encode_full(reference)


@torch.no_grad()
def injection_latents(vae_encode: Callable[[torch.Tensor], object], reference_resized: torch.Tensor,
                      seeds: Sequence[int], latent_scale: float = LATENT_SCALE) -> torch.Tensor:
    """``r_i = scale · VAE(reference resized to (H, W)).sample()`` for each image ``i`` (scale 0.18215, XL 0.13025),
    its posterior noise drawn on the CPU from ``seeds[i]`` (method §6.1; method-xl §5.6). The reference is encoded
    once. Returns (len(seeds), 4, h, w)."""
    posterior = vae_encode(reference_resized)
    mean, std = posterior.mean, posterior.std
    noise = torch.cat([torch.randn(mean.shape, generator=torch.Generator().manual_seed(int(seed)),
                                   dtype=torch.float32) for seed in seeds])
    return latent_scale * (mean + std * noise.to(mean))


@torch.no_grad()
def build_injection(options: ColorizeOptions, vae_encode: Callable[[torch.Tensor], object],
                    reference_resized: torch.Tensor, hints: Optional[list], seeds: Sequence[int], *,
                    dtype: torch.dtype, device=None, latent_scale: float = LATENT_SCALE) -> InjectionPlan:
    """The attention-injection inputs (method §6.1) of a batch whose image ``i`` has seed ``seeds[i]``: its
    reference latent drawn with CPU noise seeded ``seeds[i]`` and its per-call ε from a generator seeded
    ``seeds[i] + 1``, so an image is the same in any batch and on every host."""
    latents = injection_latents(vae_encode, reference_resized, seeds, latent_scale)
    return InjectionPlan(reference_latents=latents.to(device=device, dtype=dtype), hints=hints,
                         noise_generators=[torch.Generator().manual_seed(int(seed) + 1) for seed in seeds],
                         reference_fidelity=options.injection_reference_fidelity, start=options.injection_start)


def build_plan(options: ColorizeOptions, *, sketch_hints: list, blank_hints: list, tokens: torch.Tensor,
               injection: Optional[InjectionPlan] = None, vector: Optional[torch.Tensor] = None,
               enhance: Optional[object] = None) -> GenerationPlan:
    """The plan of one generation from validated options and prepared tensors (``tokens``: the context, with
    enhance modes their ``[fg ; bg]`` context, :func:`lib_colorize.enhance.prepare_enhance`; ``vector``: the XL
    models' y)."""
    return GenerationPlan(
        mode=guidance_mode(options.reference_guidance, options.sketch_guidance),
        reference_guidance=options.reference_guidance,
        sketch_guidance=options.sketch_guidance,
        reference_tokens=tokens,
        sketch_hints=sketch_hints,
        blank_hints=blank_hints,
        window=GuidanceWindow(options.guidance_start, options.guidance_end, options.no_guidance_start,
                              options.no_guidance_end),
        injection=injection,
        vector=vector,
        enhance=enhance,
    )
