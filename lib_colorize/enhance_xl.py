"""Low-level injection of the XL models (the app's ``bg_enhance``; method-xl §5.5, §6), on the enhance modes'
machinery (:mod:`lib_colorize.enhance`: masks, the split cross-attention, the split-LoRA hooks, the content cache).

=======  ===============================================================================================
variant  what :func:`prepare_xl_enhance` builds
=======  ===============================================================================================
sdxl     context ``[e_ref ‖ e_bg]`` (392 tokens); split cross-attention: μ = 0 ``o_f where m > τ_s else o_b``
         (the strengths do not act, as in the original), μ > 0 ``o_b where m < τ_s else o_f`` after
         ``o_f ← (1 − μ)·β_f·o_f + μ·β_b·o_b`` (§5.5)
xlv2     the same context; every attn2 q/k/v with its background LoRA ``W + U·D`` (both passes, §6.1);
         the soft blend ``m·o_f + (1 − m)·o_b`` with β and μ; the ReferenceNet's banks, read by the U-Net's
         decoder self-attention (``own where m > 0.05 else bank``, §6.2-6.3)
=======  ===============================================================================================

``e_bg`` is the XL reference encoder's context of the background image, or of the reference with its character
whitened (``rmask < τ_r``). The U-Net's mask ``m`` is the sketch mask nearest-downsampled by 8 (the original's
``F.interpolate(smask, scale_factor=0.125)``); each block resizes it bicubically to its grid. The ReferenceNet
input is ``[z_bg | m_s | m_r]`` at timestep 0 with ``y_bg`` (:func:`lib_colorize.conditioning.reference_net_input`);
``z_bg`` is drawn per image from the image's seed, like the other enhance latents, so its banks are per image.
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .enhance import BACKGROUND_LATENT_SEED, MASKED_REFERENCE_LATENT_SEED, EnhancePlan, MaskInputs, resized_image
from .errors import InvalidInput
from .options import ColorizeOptions

#: ``<attn2>.<proj>.lora_<part>_background.weight`` under ``model.diffusion_model.`` (method-xl §1.5)
XL_LORA_KEY = re.compile(r"^(?P<attn>.+\.attn2)\.(?P<proj>to_q|to_k|to_v)\.lora_(?P<part>down|up)_background\.weight$")


def check_xl_enhance(version: str, options: ColorizeOptions) -> None:
    """Low-level injection and attention injection together are refused on xlv2 (method-xl §6.8, §12 #7: the
    original's injection overwrites the ReferenceNet banks)."""
    if version == "xlv2" and options.bg_enhance and options.injection:
        raise InvalidInput("injection", "attention injection cannot be combined with low-level injection (BG "
                                        "enhance) on xlv2: the original's injection discards the ReferenceNet's "
                                        "banks; turn one of them off")


def load_xlv2_lora(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                   device="cpu") -> dict:
    """xlv2's background LoRA (210 linears) as the enhance modes' :class:`~lib_colorize.models.enhance.
    AttentionLoRA` per attn2 name, both sides the one background pair: ``tensors`` are the U-Net's LoRA tensors
    without ``model.diffusion_model.``. The LoRA then acts in both passes of the split attention, which is the
    original's merged ``W + U·D`` wherever it changes anything (a zero context gives zero keys and values)."""
    from .models.enhance import AttentionLoRA

    grouped: dict = {}
    for key, tensor in tensors.items():
        match = XL_LORA_KEY.match(key)
        if match:
            grouped.setdefault(match.group("attn"), {}).setdefault(match.group("proj"), {})[match.group("part")] = tensor
    loras = {}
    for attn, projections in grouped.items():
        shapes = {}
        for proj, parts in projections.items():
            down, up = parts["down"], parts["up"]
            shapes[proj] = (int(down.shape[1]), int(up.shape[0]), {"fg": int(down.shape[0]), "bg": int(down.shape[0])})
        lora = AttentionLoRA(shapes)
        for proj, parts in projections.items():
            split = lora.projections[proj]
            background = split.sides["bg"]
            background.down.weight.data = parts["down"].to(device=device, dtype=dtype)
            background.up.weight.data = parts["up"].to(device=device, dtype=dtype)
            split.sides["fg"] = background
        loras[attn] = lora.requires_grad_(False).eval()
    return loras


def xl_latent_mask(sketch_mask: torch.Tensor) -> torch.Tensor:
    """The XL U-Net's mask ``m``: the sketch mask (1, 1, H, W) nearest-downsampled by 8, float32."""
    return F.interpolate(sketch_mask.float(), scale_factor=0.125)


def _split(version: str, options: ColorizeOptions):
    from .processors import SplitAttention

    if version == "xlv2":
        return SplitAttention(foreground_strength=options.foreground_strength,
                              background_strength=options.background_strength,
                              merging_scale=options.merging_scale, fg_lora=True, bg_lora=True, select="blend")
    if options.merging_scale > 0:
        return SplitAttention(foreground_strength=options.foreground_strength,
                              background_strength=options.background_strength,
                              merging_scale=options.merging_scale, select="below")
    return SplitAttention(select="above")     # the additive-bias path: the strengths do not act (§5.5)


def prepare_xl_enhance(version: str, options: ColorizeOptions, tokens: torch.Tensor, inputs: MaskInputs, *,
                       encode_context: Callable[[torch.Tensor], torch.Tensor], vae_encode: Callable,
                       seeds: Sequence[int], size: Sequence[int], cache, extractors=None,
                       reference_net: Optional[Callable[[], torch.nn.Module]] = None, reference_net_key=None,
                       loras: Optional[dict] = None, latent_scale: float = 0.13025, device=None,
                       dtype: torch.dtype = torch.float32) -> tuple[EnhancePlan, torch.Tensor]:
    """The XL low-level injection of one generation (see the module table): ``(plan, context)``.

    ``tokens``: ``e_ref`` (1, 196, C); ``encode_context(image)`` -> (1, 196, C) (cached by content);
    ``vae_encode(image)`` -> the posterior; ``reference_net()`` (xlv2) -> the ReferenceNet, loaded for this and
    released by the caller afterwards (``reference_net_key``: its file, for the cache of its banks); ``loras``
    (xlv2): :func:`load_xlv2_lora`; ``extractors``: a
    :class:`lib_colorize.masks.MaskExtractors` for the reference mask xlv2's ReferenceNet reads.
    """
    from .conditioning import injection_latents, reference_net_banks, reference_net_input, reference_net_vector

    check_xl_enhance(version, options)
    height, width = (int(s) for s in size)
    threshold = options.reference_mask_threshold
    if inputs.background is not None:
        source = inputs.background
    else:
        if inputs.reference is None:
            raise InvalidInput("bg_enhance", "low-level injection needs a reference image or a background image")
        source = inputs.masked_reference(threshold)
    background_tokens = encode_context(source).to(tokens)
    context = torch.cat([tokens, background_tokens], dim=1)
    mask = xl_latent_mask(inputs.sketch_mask).to(device)
    plan = EnhancePlan(mask=mask, mask_threshold=options.sketch_mask_threshold, split=_split(version, options),
                       inputs=inputs)
    if version == "xlv2":
        plan.modules = SimpleNamespace(lora=loras or {})
        reference_mask = inputs.background_mask if inputs.background_mask is not None else inputs.reference_mask
        if reference_mask is None:
            if inputs.reference is None or extractors is None:
                raise InvalidInput("bg_enhance", "xlv2's low-level injection needs a reference image for its mask")
            reference_mask = extractors.reference(options.reference_mask_extractor, inputs.reference, dilated=True)
        resized = resized_image(source, (height, width))
        offset = BACKGROUND_LATENT_SEED if inputs.background is not None else MASKED_REFERENCE_LATENT_SEED
        z = cache.get_or_compute("xl vae latent", (resized, tuple(seeds), offset, latent_scale), lambda: (
            injection_latents(vae_encode, resized, [int(s) + offset for s in seeds], latent_scale)))
        shape = (inputs.background if inputs.background is not None else inputs.reference).shape[-2:]
        y_bg = reference_net_vector(height, width, shape[0], shape[1])
        net = None
        banks = []
        for i in range(len(seeds)):
            x_bg = reference_net_input(z[i:i + 1].float(), inputs.sketch_mask, reference_mask, (height, width))

            def compute(x_bg=x_bg):
                nonlocal net
                if net is None:
                    net = reference_net()
                parameter = next(net.parameters())
                return reference_net_banks(net, x_bg.to(parameter.device), y_bg.to(parameter.device))

            banks.append(cache.get_or_compute("reference net", (reference_net_key, x_bg, y_bg), compute))
        del net
        plan.reference_net_banks = banks
    return plan, context.to(device=device, dtype=dtype)


__all__ = ["XL_LORA_KEY", "check_xl_enhance", "load_xlv2_lora", "xl_latent_mask", "prepare_xl_enhance"]
