"""Masks of the enhance modes (method-enhance §4): the sketch mask, the reference mask, remove-foreground /
remove-background, and user-supplied masks.

=========================  ===================================================================================
function                   what (tensors (1, C, H, W); images in [-1, 1], masks in [0, 1], 1 = character)
=========================  ===================================================================================
:func:`sketch_mask`        ISNet-sketch on the white sketch ``−sketch``: bicubic to 1024², net, bicubic back,
                           clamp (§4.2)
:func:`latent_mask`        the sketch mask bicubic-downsampled by 8, not clamped: the U-Net's ``m``
:func:`isnet_mask`         ISNet crop mode: longer side to 1024, centred on a −1 canvas, **inverted** (Q7),
                           net, cut back, bicubic, clamp, optional 11×11 dilation (§4.3)
:func:`rmbg_mask`          RMBG-2.0 (BiRefNet): ``(x+1)/2``, 1024², ImageNet normalisation, last output's sigmoid,
                           back to size, dilation, clamp (§4.3; opt-in, see :data:`MASK_EXTRACTORS`)
:func:`whiten_where`       ``x where keep else white``: the masked reference ``ref_bg`` (``rmask < τ_r``),
                           remove-foreground (``bgmask < τ_r``), remove-background (``mask ≥ τ_r``) (§4.3-4.5)
:func:`mask_from_image`    a user's mask image -> [0, 1] tensor on a given canvas geometry
=========================  ===================================================================================

The weight files (:data:`MASK_EXTRACTORS`) live in ``models/ColorizeDiffusion`` (downloaded there like the line
extractors, :mod:`lib_colorize.extractors.weights`), read with safetensors only.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidInput, MissingWeights

ISNET_SIZE = 1024
DILATION = 11


@dataclass(frozen=True)
class MaskExtractorSpec:
    """A downloadable mask-extractor weight file (the fields the line extractors' weight helpers read).

    ``licence``: what the source states; ``gated``: needs the user to accept terms on the Hub first (never
    downloaded automatically).
    """

    name: str
    label: str
    weight_file: str
    hf_repo: str
    hf_filename: str
    licence: str
    gated: bool = False
    needs_weights: bool = True
    kind: str = "mask extractor"

    @property
    def source_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_filename}"


#: Every mask-extractor file, in one place (to move into the project's weights module as a group).
MASK_EXTRACTORS: dict = {
    "ISNet-sketch": MaskExtractorSpec(
        "ISNet-sketch", "ISNet-sketch (sketch mask)", "sketch-segment.safetensors", "tellurion/line_extractor",
        "sketch-segment.safetensors", licence="not stated on the Hub page (the ColorizeDiffusion author's model)"),
    "ISNet": MaskExtractorSpec(
        "ISNet", "ISNet (anime character segmentation)", "isnetis.safetensors", "tellurion/line_extractor",
        "isnetis.safetensors", licence="Apache-2.0 (SkyTNT/anime-segmentation, isnetis)"),
    "rmbg-v2": MaskExtractorSpec(
        "rmbg-v2", "RMBG-2.0 (BRIA, gated, non-commercial)", "RMBG-2.0", "briaai/RMBG-2.0", "model.safetensors",
        licence="CC BY-NC 4.0, non-commercial; gated (accept BRIA's terms on the Hub)", gated=True),
}
#: Reference-mask extractors the user can choose (the sketch mask is always ISNet-sketch).
REFERENCE_MASK_EXTRACTORS = ("ISNet", "rmbg-v2")
DEFAULT_REFERENCE_MASK_EXTRACTOR = "ISNet"
SKETCH_MASK_EXTRACTOR = "ISNet-sketch"


# ------------------------------------------------------------------------------------------------ the maths
def _net_dtype_device(net) -> tuple:
    parameter = next(net.parameters())
    return parameter.dtype, parameter.device


def _run(net, x: torch.Tensor) -> torch.Tensor:
    dtype, device = _net_dtype_device(net)
    return net(x.to(device=device, dtype=dtype)).float().cpu()


@torch.no_grad()
def sketch_mask(net, white_sketch: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """ISNet-sketch mask of the white sketch (black lines on white, padding white), (1, 1, H, W) in [0, 1]:
    ``clamp(bicubic(net(bicubic(x, 1024²)), (H, W)))``, input fed in [-1, 1] (method-enhance §4.2)."""
    height, width = size if size is not None else white_sketch.shape[-2:]
    x = F.interpolate(white_sketch.float(), size=(ISNET_SIZE, ISNET_SIZE), mode="bicubic", align_corners=False)
    mask = _run(net, x)
    return F.interpolate(mask, size=(int(height), int(width)), mode="bicubic", align_corners=False).clamp(0, 1)


def latent_mask(mask: torch.Tensor) -> torch.Tensor:
    """The U-Net's sketch mask ``m``: ``bicubic(mask, scale 1/8)``, not clamped (method-enhance §4.2, Q9)."""
    return F.interpolate(mask.float(), scale_factor=0.125, mode="bicubic", align_corners=False)


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """11×11 max-pool, stride 1, padding 5."""
    return F.max_pool2d(mask, kernel_size=DILATION, stride=1, padding=DILATION // 2)


@torch.no_grad()
def isnet_mask(net, image: torch.Tensor, dilated: bool = False) -> torch.Tensor:
    """ISNet crop-mode mask of ``image`` (1, 3, h, w) in [-1, 1] at its own size (method-enhance §4.3): scaled so
    the longer side is 1024 (bicubic by scale factor), pasted centred on a −1 canvas, the canvas mapped to
    ``1 − (canvas + 1)/2`` (inverted, padding 1: quirk Q7, reproduced), the net's mask cut back to the pasted
    region, bicubic to (h, w), clamped, then dilated when ``dilated``."""
    _, c, h, w = image.shape
    scale = ISNET_SIZE / max(h, w)
    scaled = F.interpolate(image.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    sh, sw = scaled.shape[-2:]
    canvas = -torch.ones((1, c, ISNET_SIZE, ISNET_SIZE), dtype=torch.float32)
    top, left = (ISNET_SIZE - sh) // 2, (ISNET_SIZE - sw) // 2
    canvas[:, :, top:top + sh, left:left + sw] = scaled
    mask = _run(net, 1.0 - (canvas + 1.0) / 2.0)[:, :, top:top + sh, left:left + sw]
    mask = F.interpolate(mask, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return dilate(mask) if dilated else mask


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def rmbg_mask(net, image: torch.Tensor, dilated: bool = False) -> torch.Tensor:
    """RMBG-2.0 mask (method-enhance §4.3): ``(x+1)/2`` resized to 1024² (bilinear, antialias), ImageNet
    normalisation, ``sigmoid`` of the network's last output, resized back, dilated when asked, clamped."""
    _, _, h, w = image.shape
    x = F.interpolate((image.float() + 1.0) / 2.0, size=(ISNET_SIZE, ISNET_SIZE), mode="bilinear",
                      align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    dtype, device = _net_dtype_device(net)
    out = net(((x - mean) / std).to(device=device, dtype=dtype))
    last = out[-1] if isinstance(out, (list, tuple)) else out
    mask = torch.sigmoid(last.float().cpu())
    mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if dilated:
        mask = dilate(mask)
    return mask.clamp(0, 1)


def whiten_where(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``image where keep else white (+1)``; ``keep`` (1, 1, h, w) bool broadcast over channels."""
    keep = keep.to(image.device)
    return torch.where(keep, image, torch.ones_like(image))


def mask_from_image(image: Image.Image, size: Sequence[int], box: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A user's mask image -> (1, 1, H, W) float32 in [0, 1] (grey level / 255, 1 = character).

    ``size`` = (H, W) of the canvas. With ``box`` = (left, top, w', h') the mask is resized (bicubic) to the box
    and pasted on a zero canvas: the geometry the sketch went through (:func:`~lib_colorize.preprocess.prepare_sketch`),
    so padding counts as background. Without a box it is resized to the whole canvas.
    """
    height, width = (int(s) for s in size)
    grey = image.convert("L")
    left, top, w, h = box if box is not None else (0, 0, width, height)
    resized = grey.resize((int(w), int(h)), Image.BICUBIC) if grey.size != (int(w), int(h)) else grey
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:top + int(h), left:left + int(w)] = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(canvas)[None, None]


def pad_mask_with_margin(mask: Image.Image, margin: float) -> Image.Image:
    """A reference mask padded like the reference (width × margin, centred, padding = background 0)."""
    if float(margin) == 1.0:
        return mask
    w0, h0 = mask.size
    new_width = int(w0 * float(margin))
    canvas = Image.new("L", (new_width, h0), 0)
    canvas.paste(mask.convert("L"), ((new_width - w0) // 2, 0))
    return canvas


def mask_preview(mask: torch.Tensor, threshold: float) -> Image.Image:
    """The gallery image of a mask: values below ``threshold`` zeroed (as the original's gallery), grey."""
    shown = torch.where(mask >= threshold, mask, torch.zeros_like(mask))
    array = (shown[0, 0].clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array, mode="L")


# ------------------------------------------------------------------------------------------------ loading
_cache: dict = {}
_lock = threading.Lock()


def get_spec(name: Any) -> MaskExtractorSpec:
    spec = MASK_EXTRACTORS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise InvalidInput("reference_mask_extractor", f"unknown mask extractor {name!r}; valid: "
                                                       f"{', '.join(REFERENCE_MASK_EXTRACTORS)}")
    return spec


def _load_isnet(path):
    from safetensors.torch import load_file

    from ..extractors.weights import load_into
    from .isnet import ISNet

    state = load_file(str(path), device="cpu")
    state = {k.replace("module.", ""): v for k, v in state.items()}
    try:
        net = ISNet.from_state_dict(state)
    except KeyError as error:
        from ..errors import CheckpointError

        raise CheckpointError(path, f"is not an IS-Net weight file (missing {error.args[0]})") from None
    return load_into(net, path)


def _load_rmbg(folder: str):
    """RMBG-2.0 from a local folder the user downloaded after accepting BRIA's terms (never fetched here)."""
    if not os.path.isdir(folder):
        spec = MASK_EXTRACTORS["rmbg-v2"]
        raise MissingWeights(
            f"ColorizeDiffusion: the reference mask extractor rmbg-v2 (BRIA RMBG-2.0, {spec.licence}) is not "
            f"installed. Accept the terms at https://huggingface.co/{spec.hf_repo}, download the repository into "
            f"{folder}, or choose the ISNet extractor (Apache-2.0, downloaded automatically).")
    try:
        from transformers import AutoModelForImageSegmentation
    except ImportError:
        raise MissingWeights("ColorizeDiffusion: rmbg-v2 needs the 'transformers' package") from None
    # BiRefNet ships its model code with the weights; it runs from the user's own download, never the network
    return AutoModelForImageSegmentation.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                         use_safetensors=True)


def load_mask_extractor(name: str, *, models_dir=None, device: Any = "cpu", allow_download: bool = True):
    """The cached network of a mask extractor (``ISNet-sketch``, ``ISNet`` or ``rmbg-v2``) on ``device``."""
    from ..extractors.weights import ensure_weights, resolve_models_dir

    spec = get_spec(name)
    folder = resolve_models_dir(models_dir)
    key = (name, str(folder))
    with _lock:
        net = _cache.get(key)
        if net is None:
            if spec.gated:
                net = _load_rmbg(str(folder / spec.weight_file))
            else:
                net = _load_isnet(ensure_weights(spec, folder, allow_download=allow_download))
            net = net.eval().requires_grad_(False)
            _cache[key] = net
    return net.to(device)


def unload_mask_extractors() -> None:
    with _lock:
        _cache.clear()


def extract_reference_mask(name: str, net, image: torch.Tensor, dilated: bool) -> torch.Tensor:
    """The reference-mask extractor ``name``'s mask of ``image`` (ISNet crop mode or RMBG)."""
    return rmbg_mask(net, image, dilated) if get_spec(name).gated else isnet_mask(net, image, dilated)


class MaskExtractors:
    """The mask extractors of one host: networks loaded on first use (from ``models_dir``, downloaded there when
    allowed), masks cached by input content (``cache``, a :class:`lib_colorize.cache.ContentCache`)."""

    def __init__(self, models_dir=None, device: Any = "cpu", allow_download: bool = True, cache=None,
                 offload: bool = False):
        from ..cache import ContentCache

        self.models_dir, self.device, self.allow_download = models_dir, device, allow_download
        self.cache = cache if cache is not None else ContentCache()
        self.offload = offload

    def network(self, name: str):
        return load_mask_extractor(name, models_dir=self.models_dir, device=self.device,
                                   allow_download=self.allow_download)

    def _run(self, name: str, compute):
        net = self.network(name)
        try:
            return compute(net)
        finally:
            if self.offload:
                net.to("cpu")   # the original moves the extractors back to the CPU after use (§12)

    def sketch(self, white_sketch: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """ISNet-sketch mask (1, 1, H, W) of the white sketch."""
        return self.cache.get_or_compute("sketch mask", (SKETCH_MASK_EXTRACTOR, white_sketch, tuple(size)),
                                         lambda: self._run(SKETCH_MASK_EXTRACTOR,
                                                           lambda net: sketch_mask(net, white_sketch, size)))

    def reference(self, name: str, image: torch.Tensor, dilated: bool) -> torch.Tensor:
        """Reference-mask extractor ``name``'s mask (1, 1, h, w) of ``image`` (reference, background, result)."""
        get_spec(name)
        return self.cache.get_or_compute("reference mask", (name, image, bool(dilated)),
                                         lambda: self._run(name, lambda net: extract_reference_mask(
                                             name, net, image, dilated)))


__all__ = ["ISNET_SIZE", "MaskExtractorSpec", "MASK_EXTRACTORS", "REFERENCE_MASK_EXTRACTORS",
           "DEFAULT_REFERENCE_MASK_EXTRACTOR", "SKETCH_MASK_EXTRACTOR", "sketch_mask", "latent_mask", "dilate",
           "isnet_mask", "rmbg_mask", "whiten_where", "mask_from_image", "pad_mask_with_margin", "mask_preview",
           "get_spec", "load_mask_extractor", "unload_mask_extractors", "extract_reference_mask", "MaskExtractors"]
