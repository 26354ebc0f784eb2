"""The enhance modes of every version, prepared once per generation (per sampling pass): method-enhance §5-§8.

=============  ==========================================================================================
version        what :func:`prepare_enhance` builds (context ``[fg ; bg]`` halves, LoRA sides, encoder outputs)
=============  ==========================================================================================
v1 BG          ``[E ; G]``, ``G = CLIP_local(background or ref_bg)``; plain split attention, no LoRA (§5)
v1.5 BG        ``[E + e_s ; G]``, ``G = CLIP_local(B) + e_r`` or ``CT(CLIP_local(ref_bg) + e_r)``; bg LoRA (§6.1)
v1.5 FG        ``[E ; E]``; fg LoRA (§6.3)
v1.5 FG+BG     ``[E + e_s ; G ; E + e_s ; G]`` (both halves ``[E + e_s ; G]``, Q3, for every batch size); both
v2 style       ``M = style_encoder(VAE(ref), y(ref), E)``, with a background ``(1 − μ)·M_ref + μ·M_B`` (§7.1)
v2 BG          ``[E ; G]`` and ``hs_bg = κ·bg_encoder(...)`` by the table of §7.2 (Q5); both LoRAs
v2 FG          ``[E ; E]`` (``[E ; G_B]`` after style with a background, Q17); no LoRA (§7.3)
=============  ==========================================================================================

``E`` = the reference tokens after manipulation; ``ref_bg`` = the reference with its character whitened
(``rmask ≥ τ_r``); ``e_r, e_s`` = the v1.5 threshold embeddings of ``τ_r, τ_s``. Every row group gets the
same mask, ``hs_bg`` and style vectors (the reference-uncond rows too, Q12); the context's rows follow the
default mode's layout (zeros for ``u_ref``). Foreground/background strength are honoured in every version
(Q1, a deliberate deviation from v1/v1.5, which force 1). VAE latents are drawn with CPU noise seeded from each
image's seed (Q6), so image ``i`` of a batch is its generation alone.

The masks come from :class:`lib_colorize.masks.MaskExtractors` (or the user's images) through
:func:`prepare_mask_inputs`. Everything is computed once and cached by content (:class:`~lib_colorize.cache.
ContentCache`); :class:`EnhancePlan` hands each U-Net call its typed fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidInput
from .options import FIELD_BY_NAME, ColorizeOptions

VERSION_LABELS = {"v1": "v1 (mult-*)", "v1.5": "v1.5 (switch-eps)", "v2": "v2 (v2-full)", "sdxl": "XL sdxl",
                  "xlv2": "XL xlv2"}
#: Options that only some versions honour: key -> the versions that do (any other value than the default on
#: another version is refused, naming the key and the version it needs).
VERSION_NEEDS = {
    "style_enhance": ("v2",),
    "fg_enhance": ("v1.5", "v2"),
    "background_factor": ("v2",),
}
#: The seed offsets of the VAE posterior noise of the enhance latents (the initial noise uses ``seed``, the
#: injection latent ``seed`` and its ε ``seed + 1``).
REFERENCE_LATENT_SEED, BACKGROUND_LATENT_SEED, MASKED_REFERENCE_LATENT_SEED = 2, 3, 4


def check_version(options: ColorizeOptions, version: str) -> None:
    """Refuse an option the loaded model cannot honour, naming the key and the versions that can."""
    for key, versions in VERSION_NEEDS.items():
        value = getattr(options, key)
        if value != FIELD_BY_NAME[key].default and version not in versions:
            needed = " or ".join(VERSION_LABELS[v] for v in versions)
            raise InvalidInput(key, f"needs a {needed} checkpoint; the loaded checkpoint is "
                                    f"{VERSION_LABELS.get(version, version)}")


def capabilities(version: str) -> dict:
    """Which enhance controls a version honours (UI visibility): control -> bool."""
    return {"style_enhance": version == "v2", "bg_enhance": version in VERSION_LABELS,
            "fg_enhance": version in ("v1.5", "v2"), "background_factor": version == "v2"}


def needed_parts(version: str, options: ColorizeOptions) -> tuple:
    """The checkpoint's extra modules (:data:`lib_colorize.checkpoint.ENHANCE_PARTS`) the options need."""
    parts: list = []
    if version == "v1.5" and options.mask_guided:
        parts.append("lora")
        if options.bg_enhance:
            parts.append("thresh_embedder")
            if options.background is None:
                parts.append("cluster_transformer")
    elif version == "v2":
        if options.style_enhance:
            parts += ["style_encoder", "style_modules"]
        if options.mask_guided:
            parts.append("lora")
        if options.bg_enhance:
            parts += ["bg_encoder", "warp_modules"]
    return tuple(parts)


def mode_label(options: ColorizeOptions) -> str:
    """``style+FG+BG``-style name of the active enhance modes (messages, bench rows)."""
    names = [n for n, on in (("style", options.style_enhance), ("FG", options.fg_enhance),
                             ("BG", options.bg_enhance)) if on]
    return "+".join(names) or "default"


# ------------------------------------------------------------------------------------------------- masks
@dataclass
class MaskInputs:
    """The images and masks of one generation's enhance modes (method-enhance §4), CPU float32.

    ``sketch_mask`` (1, 1, H, W) and ``latent_mask`` (1, 1, H/8, W/8) for BG/FG enhance; ``reference`` and
    ``background`` after pad-with-margin (the background after remove-foreground); ``reference_mask`` on the
    padded reference (only where the masked reference is needed); ``background_mask`` with remove-foreground.
    """

    sketch_mask: Optional[torch.Tensor] = None
    latent_mask: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    reference_mask: Optional[torch.Tensor] = None
    background: Optional[torch.Tensor] = None
    background_mask: Optional[torch.Tensor] = None

    def masked_reference(self, threshold: float) -> torch.Tensor:
        """``ref_bg = ref where rmask < τ_r else white`` (method-enhance §4.3)."""
        from .masks import whiten_where

        return whiten_where(self.reference, self.reference_mask < threshold)

    def previews(self, options: ColorizeOptions) -> list:
        """Gallery images of the masks used (values under the threshold zeroed, as the original's gallery)."""
        from .masks import mask_preview

        out = []
        if self.sketch_mask is not None:
            out.append(mask_preview(self.sketch_mask, options.sketch_mask_threshold))
        for mask in (self.reference_mask, self.background_mask):
            if mask is not None:
                out.append(mask_preview(mask, options.reference_mask_threshold))
        return out


def prepare_mask_inputs(options: ColorizeOptions, sketch: Optional[torch.Tensor], box, extractors) -> MaskInputs:
    """Reference, background and masks for ``options`` (nothing is extracted that the modes do not read, Q13).

    ``sketch``: the prepared sketch (1, 3, H, W) in the sketch domain; ``box``: where the sketch sits in it;
    ``extractors``: a :class:`lib_colorize.masks.MaskExtractors`. The user's own masks replace extraction.
    """
    from .masks import mask_from_image, pad_mask_with_margin, whiten_where
    from .preprocess import image_to_tensor, pad_reference_with_margin, prepare_reference

    inputs = MaskInputs(reference=prepare_reference(options.reference, options.pad_reference))
    if options.background is not None:
        inputs.background = image_to_tensor(pad_reference_with_margin(options.background, options.pad_reference))
    threshold = options.reference_mask_threshold
    if options.mask_guided:
        size = tuple(sketch.shape[-2:])
        if options.sketch_mask is not None:
            inputs.sketch_mask = mask_from_image(options.sketch_mask, size, box)
        else:
            inputs.sketch_mask = extractors.sketch(-sketch, size)
        from .masks import latent_mask

        inputs.latent_mask = latent_mask(inputs.sketch_mask)
    if inputs.background is not None and options.remove_foreground and (options.bg_enhance or options.style_enhance):
        inputs.background_mask = extractors.reference(options.reference_mask_extractor, inputs.background,
                                                      dilated=True)
        inputs.background = whiten_where(inputs.background, inputs.background_mask < threshold)
    if options.bg_enhance and inputs.background is None:
        if inputs.reference is None:
            raise InvalidInput("bg_enhance", "BG enhance needs a reference image or a background image")
        if options.reference_mask is not None:
            padded = pad_mask_with_margin(options.reference_mask, options.pad_reference)
            inputs.reference_mask = mask_from_image(padded, tuple(inputs.reference.shape[-2:]))
        else:
            inputs.reference_mask = extractors.reference(options.reference_mask_extractor, inputs.reference,
                                                         dilated=True)
    return inputs


def remove_background(images: Sequence, extract: Callable[[torch.Tensor], torch.Tensor], threshold: float) -> list:
    """``result where mask ≥ τ_r else white`` for each PIL result, ``mask = extract(result)`` (no dilation,
    method-enhance §4.5)."""
    import numpy as np
    from PIL import Image

    from .preprocess import image_to_tensor

    out = []
    for image in images:
        rgb = image.convert("RGB")
        keep = (extract(image_to_tensor(rgb)) >= threshold)[0, 0].cpu().numpy()
        pixels = np.asarray(rgb).copy()
        pixels[~keep] = 255           # on the pixels themselves: the kept ones stay exactly as decoded
        out.append(Image.fromarray(pixels))
    return out


# ---------------------------------------------------------------------------------------- building blocks
def resized_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``bicubic(x, (H, W))`` without antialias, aspect not kept (the original's ``warp_resize``)."""
    return F.interpolate(image.float(), size=tuple(int(s) for s in size), mode="bicubic", align_corners=False)


def threshold_embeddings(embedder, reference_threshold: float, sketch_threshold: float):
    """v1.5 ``[e(τ_r), e(τ_s)]`` in one call: two (1, 1, C) float32 tensors (method-enhance §3.1)."""
    emb = embedder(torch.tensor([float(reference_threshold), float(sketch_threshold)])).float()
    return emb[0:1], emb[1:2]


def v15_background_tokens(local_tokens: torch.Tensor, e_r: torch.Tensor, cluster_transformer=None) -> torch.Tensor:
    """v1.5 background tokens: ``CLIP_local(B) + e_r`` (background image) or ``CT(CLIP_local(ref_bg) + e_r)``."""
    tokens = local_tokens.float() + e_r.to(local_tokens.device)
    if cluster_transformer is None:
        return tokens
    return cluster_transformer(tokens.to(next(cluster_transformer.parameters()).device)).float()


def style_modulations(encoder, z_reference, y_reference, reference_tokens, merging_scale: float = 0.0,
                      background: Optional[tuple] = None) -> list:
    """v2 style vectors ``M`` (method-enhance §7.1): ``style_encoder(z_r, y(ref), E)``; with a background
    ``(z_b, y(B), G_B)`` one call on both and ``M_j = (1 − μ)·M_j^ref + μ·M_j^B``. 12 tensors (1, 2ch_j)."""
    if background is None:
        return encoder(z_reference, y_reference, reference_tokens)
    z_b, y_b, tokens_b = background
    both = encoder(torch.cat([z_reference, z_b.to(z_reference)]), torch.cat([y_reference, y_b]),
                   torch.cat([reference_tokens, tokens_b.to(reference_tokens)]))
    mu = float(merging_scale)
    return [(1.0 - mu) * m[0:1] + mu * m[1:2] for m in both]


def background_hints(encoder, z, y, context, factor: float) -> list:
    """v2 ``hs_bg = κ·bg_encoder(z, t=0, y, context)``: 12 token maps (1, H_j·W_j, C_j) (method-enhance §7.2)."""
    return [h * float(factor) for h in encoder(z, y, context)]


def split_sides(version: str, options: ColorizeOptions) -> tuple[bool, bool]:
    """``(use_fg_lora, use_bg_lora)`` of the LoRA layers (method-enhance §6, §7.2-7.3)."""
    if version == "v1.5":
        return options.fg_enhance, options.bg_enhance
    if version == "v2":
        return options.bg_enhance, options.bg_enhance
    return False, False


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class EnhancePlan:
    """The enhance inputs of one generation, handed to every U-Net call (:meth:`call_fields`).

    ``hs_bg`` / ``style_modulations``: per image of the batch, 12 tensors each (None when the mode is off).
    ``split``: the template of each call's :class:`~lib_colorize.processors.SplitAttention` (None: no split).
    """

    modules: Optional[object] = None
    mask: Optional[torch.Tensor] = None
    mask_threshold: float = 0.05
    split: Optional[object] = None
    hs_bg: Optional[list] = None
    style_modulations: Optional[list] = None
    inputs: Optional[MaskInputs] = None
    #: xlv2: per image of the batch, the ReferenceNet's banks (:mod:`lib_colorize.enhance_xl`)
    reference_net_banks: Optional[list] = None

    def processors(self) -> list:
        from .processors import SkipWarp, SplitCrossAttention, SplitLoRAHooks, StyleModulation

        loras = getattr(self.modules, "lora", None) or {}
        out = []
        if self.split is not None:
            out.append(SplitCrossAttention(tuple(loras)))
            if loras and (self.split.fg_lora or self.split.bg_lora):
                out.append(SplitLoRAHooks(loras))
        if self.hs_bg is not None:
            out.append(SkipWarp(self.modules.warp_modules))
        if self.style_modulations is not None:
            out.append(StyleModulation(self.modules.style_modules))
        if self.reference_net_banks is not None:
            from .processors import ReferenceNetBankRead

            out.append(ReferenceNetBankRead())
        return out

    def call_fields(self, image: int, window_open: bool) -> dict:
        """The :class:`~lib_colorize.processors.UNetCall` fields of one call of image ``image``. Outside the
        guidance window the context is one zero token and attn2 runs unsplit: the split over a zero context of
        any length gives the same (method-enhance §8.3); mask, ``hs_bg`` and style stay."""
        split = dataclasses.replace(self.split) if self.split is not None and window_open else None
        fields = {"mask": self.mask, "mask_threshold": self.mask_threshold, "split": split,
                  "hs_bg": self.hs_bg[image] if self.hs_bg is not None else None,
                  "style_modulations": self.style_modulations[image] if self.style_modulations is not None else None}
        if self.reference_net_banks is not None:
            from .processors import ReferenceNetRead

            # every row reads; the attn1 split does not depend on the context (method-xl §6.3)
            fields["reference_net"] = ReferenceNetRead(self.reference_net_banks[image], self.mask)
        return fields


def prepare_enhance(version: str, options: ColorizeOptions, modules, tokens: torch.Tensor, inputs: MaskInputs, *,
                    encode_local: Callable[[torch.Tensor], torch.Tensor], vae_encode: Callable,
                    seeds: Sequence[int], size: Sequence[int], cache, device=None,
                    dtype: torch.dtype = torch.float32) -> tuple[EnhancePlan, torch.Tensor]:
    """The enhance plan and the cross-attention context of one generation (see the module table).

    ``tokens``: ``E`` (1, n, C); ``encode_local(image)`` -> (1, n, C) CLIP patch tokens (cached by content);
    ``vae_encode(image (1, 3, H, W))`` -> the VAE posterior; ``seeds``: one per image; ``size``: (H, W);
    ``cache``: a :class:`~lib_colorize.cache.ContentCache`. Returns ``(plan, context)`` with the context
    (1, 2n or 4n, C) on ``device`` in ``dtype`` (``E`` itself when no split attention runs).
    """
    from .conditioning import injection_latents
    from .models.enhance import size_embedding
    from .processors import SplitAttention

    height, width = (int(s) for s in size)
    E = tokens.float()
    plan = EnhancePlan(modules=modules, inputs=inputs, mask_threshold=options.sketch_mask_threshold)
    background = inputs.background

    def local(image: torch.Tensor) -> torch.Tensor:
        return encode_local(image).float().to(E.device)

    def latents(image: torch.Tensor, offset: int) -> torch.Tensor:
        resized = resized_image(image, (height, width))
        return cache.get_or_compute("vae latent", (resized, tuple(seeds), offset), lambda: injection_latents(
            vae_encode, resized, [int(s) + offset for s in seeds]))

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    G = None
    G_B = None
    z_b = None
    if version == "v2" and options.style_enhance:
        encoder = modules.style_encoder
        z_ref = latents(inputs.reference, REFERENCE_LATENT_SEED)
        y_ref = size_embedding(inputs.reference.shape[-2:], (height, width))
        extra = None
        if background is not None:
            z_b = latents(background, BACKGROUND_LATENT_SEED)
            G_B = local(background)
            extra_y = size_embedding(background.shape[-2:], (height, width))
        per_image = []
        for i in range(len(seeds)):
            if background is not None:
                extra = (to_device(z_b[i:i + 1]), extra_y, to_device(G_B))
            per_image.append(cache.get_or_compute(
                "style encoder", (encoder, z_ref[i:i + 1], y_ref, E, options.merging_scale, extra),
                lambda i=i, extra=extra: style_modulations(encoder, to_device(z_ref[i:i + 1]), y_ref, to_device(E),
                                                           options.merging_scale, extra)))
        plan.style_modulations = per_image

    if options.bg_enhance:
        if version == "v1":
            G = local(background if background is not None else inputs.masked_reference(
                options.reference_mask_threshold))
        elif version == "v1.5":
            e_r, e_s = threshold_embeddings(modules.thresh_embedder, options.reference_mask_threshold,
                                            options.sketch_mask_threshold)
            if background is not None:
                G = v15_background_tokens(local(background), e_r)
            else:
                source = local(inputs.masked_reference(options.reference_mask_threshold))
                G = cache.get_or_compute("cluster transformer", (modules.cluster_transformer, source, e_r),
                                         lambda: v15_background_tokens(source, e_r, modules.cluster_transformer))
            E_fg = E + e_s.to(E.device)
        else:
            if background is None:
                ref_bg = inputs.masked_reference(options.reference_mask_threshold)
                z, G = latents(ref_bg, MASKED_REFERENCE_LATENT_SEED), local(ref_bg)
                encoder_context, y = E, size_embedding(inputs.reference.shape[-2:], (height, width))
            elif options.style_enhance:
                z, G = z_b, G_B
                encoder_context = E          # quirk Q5: the reference tokens, not the background's
                y = size_embedding(background.shape[-2:], (height, width))
            else:
                z, G = latents(background, BACKGROUND_LATENT_SEED), local(background)
                encoder_context, y = G, size_embedding(background.shape[-2:], (height, width))
            encoder = modules.bg_encoder
            plan.hs_bg = [cache.get_or_compute(
                "bg encoder", (encoder, z[i:i + 1], y, encoder_context, options.background_factor),
                lambda i=i: background_hints(encoder, to_device(z[i:i + 1]), y, to_device(encoder_context),
                                             options.background_factor)) for i in range(len(seeds))]

    if options.mask_guided:
        if options.bg_enhance and version == "v1.5":
            half = torch.cat([E_fg, G], dim=1)
            context = torch.cat([half, half], dim=1) if options.fg_enhance else half   # Q3
        elif options.bg_enhance:
            context = torch.cat([E, G], dim=1)
        else:
            second = G_B if (version == "v2" and G_B is not None) else E               # Q17
            context = torch.cat([E, second], dim=1)
        fg_lora, bg_lora = split_sides(version, options)
        plan.split = SplitAttention(foreground_strength=options.foreground_strength,
                                    background_strength=options.background_strength,
                                    merging_scale=options.merging_scale, fg_lora=fg_lora, bg_lora=bg_lora)
        plan.mask = inputs.latent_mask.to(device)   # float32: the thresholds compare in full precision
    else:
        context = E
    return plan, to_device(context)


__all__ = ["VERSION_LABELS", "VERSION_NEEDS", "check_version", "capabilities", "needed_parts", "mode_label",
           "MaskInputs", "prepare_mask_inputs", "remove_background", "resized_image", "threshold_embeddings",
           "v15_background_tokens", "style_modulations", "background_hints", "split_sides", "EnhancePlan",
           "prepare_enhance"]
