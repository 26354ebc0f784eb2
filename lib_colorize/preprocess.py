"""Image <-> tensor conversion, sketch preparation, reference padding and result cropping (method §8).

Tensors are NCHW float32 in [-1, 1] on the CPU (callers move them to their device). "Sketch domain" means
background -1 (black), lines +1 (white). Sizes are given as ``(H, W)`` where a tensor shape is meant and as
``(width, height)`` where a PIL size is meant; each function says which.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from .errors import InvalidInput
from .images import decode_image
from .options import SKETCH_MODES

__all__ = [
    "image_to_tensor", "tensor_to_images", "check_resolution", "round_to_multiple_of_64", "default_size_for",
    "prepare_sketch", "pad_image", "pad_reference_with_margin", "shift_box", "crop_to_box", "reference_for_injection",
    "RESOLUTION_MULTIPLE", "autofit_size",
]

#: Output sides must be multiples of this (latent side divisible by 8: three U-Net downsamplings; §8.4).
RESOLUTION_MULTIPLE = 64

#: ``extractor(square_image, m) -> (1, 3, m, m)`` in the sketch domain (``lib_colorize.extractors``).
Extractor = Callable[[Image.Image, int], torch.Tensor]
#: ``(left, top, width, height)`` of the sketch inside the canvas, in canvas pixels.
Box = tuple[int, int, int, int]


def _resize(size: Sequence[int]) -> T.Resize:
    """torchvision ``Resize((h, w))``, bicubic with antialias (the original's ``resize`` partial)."""
    return T.Resize(tuple(int(s) for s in size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)


# ------------------------------------------------------------------------------------- conversion (§8.1)
def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``(1, 3, H, W)`` float32 in [-1, 1]: ``ToTensor`` then ``Normalize(0.5, 0.5)`` (§8.1).

    Non-RGB images are converted first (transparency over white)."""
    x = TF.to_tensor(decode_image(image, "image"))
    return TF.normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unsqueeze(0)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [-1, 1] -> RGB images: clamp, ``(x + 1) * 127.5``, uint8 by truncation (§8.5).

    Computed in float32 whatever the input dtype.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W); got {tuple(x.shape)}")
    arrays = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a.astype(np.uint8)) for a in arrays]


# ------------------------------------------------------------------------------------- resolution (§8.4)
def check_resolution(width: int, height: int, multiple: int = RESOLUTION_MULTIPLE) -> None:
    """Raise :class:`InvalidInput` (field ``width``/``height``) unless both are multiples of ``multiple`` (64;
    the XL models: 32, method-xl §7.2) and at least that."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
                isinstance(value, float) and value.is_integer()):
            raise InvalidInput(name, f"expected a whole number of pixels, got {value!r}")
        value = int(value)
        if value < multiple or value % multiple:
            nearest = max(multiple, int(round(value / multiple)) * multiple)
            raise InvalidInput(name, f"{value} px is not a multiple of {multiple} (at least {multiple}); try "
                                     f"{nearest}")


def autofit_size(sketch_size: tuple[int, int], area: int = 1024 * 1024, multiple: int = 32,
                 limits: tuple[int, int] = (768, 1536)) -> tuple[int, int]:
    """The XL app's "Autofit size" (method-xl §7.2): ``(W, H)`` for a sketch of PIL size ``(w0, h0)``.

    ``a = w0 / h0``; ``h' = ⌊√(area / a)⌋``, ``w' = ⌊h' a⌋``; each rounded to the nearest multiple of 32
    (``⌊(v + 16) / 32⌋ · 32``) and clamped to [768, 1536] on its own (extreme aspect ratios lose their ratio).
    """
    w0, h0 = (int(v) for v in sketch_size)
    if w0 < 1 or h0 < 1:
        raise InvalidInput("sketch", f"image is empty ({w0}x{h0} px)")
    aspect = w0 / h0
    height = int((area / aspect) ** 0.5)
    width = int(height * aspect)
    lo, hi = limits
    fit = [max(lo, min(hi, (v + multiple // 2) // multiple * multiple)) for v in (width, height)]
    return fit[0], fit[1]


def round_to_multiple_of_64(width: float, height: float) -> tuple[int, int]:
    """Nearest multiples of 64 (halves round to even, at least 64) of a width and height.

    The command line uses it to turn a size derived from the sketch into a valid output size.
    """
    def one(value: float) -> int:
        return max(RESOLUTION_MULTIPLE, int(round(float(value) / RESOLUTION_MULTIPLE)) * RESOLUTION_MULTIPLE)

    return one(width), one(height)


def default_size_for(sketch_size: tuple[int, int], native: int = 512, max_side: int = 2048,
                     width: Optional[int] = None, height: Optional[int] = None) -> tuple[int, int]:
    """Output ``(W, H)`` for a sketch of PIL size ``(w0, h0)``: the sketch's aspect ratio at about
    ``native * native`` pixels, each side rounded to a multiple of 64 and kept within [64, ``max_side``].

    ``W = native sqrt(w0 / h0)``, ``H = native sqrt(h0 / w0)`` before rounding (so ``W H = native²``). When one
    side is given, the other keeps the aspect ratio: ``H = width h0 / w0`` (or ``W = height w0 / h0``), rounded.
    """
    w0, h0 = (int(v) for v in sketch_size)
    if w0 < 1 or h0 < 1:
        raise InvalidInput("sketch", f"image is empty ({w0}x{h0} px)")
    aspect = w0 / h0
    if width and height:
        return width, height
    if width:
        return width, min(round_to_multiple_of_64(width, width / aspect)[1], max(max_side, width))
    if height:
        return min(round_to_multiple_of_64(height * aspect, height)[0], max(max_side, height)), height
    width, height = round_to_multiple_of_64(native * math.sqrt(aspect), native * math.sqrt(1.0 / aspect))
    limit = max(RESOLUTION_MULTIPLE, max_side // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)
    return min(width, limit), min(height, limit)


# ----------------------------------------------------------------------------------------- sketch (§8.2)
def pad_image(image: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, Box]:
    """Centre ``image`` ``(B, C, h', w')`` in a ``(B, C, height, width)`` canvas of -1 (the original's
    ``pad_image``): ``left = (width - w') // 2``, ``top = (height - h') // 2``. Returns the canvas and the
    box ``(left, top, w', h')``."""
    b, c, h, w = image.shape
    if h > height or w > width:
        raise ValueError(f"{w}x{h} image does not fit a {width}x{height} canvas")
    canvas = -torch.ones((b, c, height, width), dtype=image.dtype, device=image.device)
    left, top = (width - w) // 2, (height - h) // 2
    canvas[:, :, top:top + h, left:left + w] = image
    return canvas, (left, top, w, h)


#: The XL app runs its line extractors at this size (method-xl §7.2).
XL_EXTRACTOR_SIZE = 768


def prepare_sketch(sketch: Optional[Image.Image], mode: str, size: tuple[int, int],
                   extractor: Optional[Extractor] = None, xl: bool = False) -> tuple[torch.Tensor, Box]:
    """Sketch -> ``(1, 3, H, W)`` tensor in the sketch domain and the box it occupies (method §8.2).

    ``size`` is ``(H, W)``. For a sketch of PIL size ``(w0, h0)`` and ``r = min(H / h0, W / w0)``:

    * ``none``: ``to_tensor`` (already white lines on black);
    * ``invert``: ``-to_tensor`` (black lines on white paper);
    * ``extract``: ``extractor(Resize((m, m))(sketch), m)`` with ``m = max(H, W)`` (mid-2024 behaviour; the
      callable returns ``(1, 3, m, m)`` in the sketch domain);

    then torchvision ``Resize((int(h0 r), int(w0 r)))`` on the tensor (bicubic, antialias, not clamped) and
    :func:`pad_image` into a -1 canvas. The box ``(left, top, w', h')`` is what "Crop result" crops back to.
    No sketch gives an all -1 canvas and the full box ``(0, 0, W, H)``.

    ``xl``: the XL app's way (method-xl §7.2): ``none``/``invert`` resize the PIL image (bicubic, antialias) and
    paste it centred on a white PIL canvas before the tensor (negated for ``invert``, so the canvas becomes the -1
    background; with ``none`` it stays +1, as in the app); ``extract`` runs the extractor at 768².
    """
    height, width = (int(s) for s in size)
    if mode not in SKETCH_MODES:
        raise InvalidInput("sketch_mode", f"{mode!r} is not one of {', '.join(SKETCH_MODES)}")
    if sketch is None:
        return -torch.ones((1, 3, height, width), dtype=torch.float32), (0, 0, width, height)
    sketch = decode_image(sketch, "sketch")
    w0, h0 = sketch.size
    r = min(height / h0, width / w0)
    fitted = (int(h0 * r), int(w0 * r))
    if xl and mode != "extract":
        resized = _resize(fitted)(sketch)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        left, top = (width - resized.width) // 2, (height - resized.height) // 2
        canvas.paste(resized, (left, top))
        x = image_to_tensor(canvas)
        return (-x if mode == "invert" else x), (left, top, resized.width, resized.height)
    if mode == "none":
        x = image_to_tensor(sketch)
    elif mode == "invert":
        x = -image_to_tensor(sketch)
    else:
        if extractor is None:
            raise ValueError("sketch_mode 'extract' needs a line extractor callable")
        side = XL_EXTRACTOR_SIZE if xl else max(height, width)
        x = extractor(_resize((side, side))(sketch), side)
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"line extractor returned {tuple(x.shape)}; expected (1, 3, {side}, {side})")
        x = x.float()
    x = _resize(fitted)(x)
    return pad_image(x, height, width)


# -------------------------------------------------------------------------------------- reference (§8.3)
def pad_reference_with_margin(image: Image.Image, margin: float) -> Image.Image:
    """White margins left and right (method §8.3): margin 1 returns ``image`` unchanged; otherwise a white
    RGB canvas ``(int(w0 margin), h0)`` with the reference pasted at ``((int(w0 margin) - w0) // 2, 0)``.
    The height is unchanged."""
    margin = float(margin)
    if not math.isfinite(margin) or margin < 1.0:
        raise InvalidInput("pad_reference", f"margin must be at least 1, got {margin}")
    if margin == 1.0:
        return image
    w0, h0 = image.size
    new_width = int(w0 * margin)
    canvas = Image.new("RGB", (new_width, h0), (255, 255, 255))
    canvas.paste(decode_image(image, "reference"), ((new_width - w0) // 2, 0))
    return canvas


def prepare_reference(image: Optional[Image.Image], margin: float) -> Optional[torch.Tensor]:
    """The reference as the CLIP encoder takes it: padded with margin (method §8.3), (1,3,H,W) in [-1, 1];
    None without a reference."""
    if image is None:
        return None
    return image_to_tensor(pad_reference_with_margin(image, margin))


def reference_for_injection(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Attention-injection reference (method §6.1): the *unpadded* reference resized to exactly ``size`` =
    ``(H, W)`` (torchvision ``Resize`` on the PIL image, bicubic, antialias; aspect not kept), as
    ``(1, 3, H, W)`` in [-1, 1]."""
    return image_to_tensor(_resize(size)(decode_image(image, "reference")))


# ----------------------------------------------------------------------------------------- output (§8.5)
def shift_box(box: Box, offset: tuple[int, int], size: tuple[int, int]) -> Box:
    """``box`` in a canvas cut at ``offset`` = ``(left, top)`` to ``size`` = ``(width, height)``: moved by the
    offset and clipped to the cut (an empty box when nothing of it is left)."""
    left, top, width, height = box
    x0, y0 = max(0, left - offset[0]), max(0, top - offset[1])
    x1, y1 = min(size[0], left - offset[0] + width), min(size[1], top - offset[1] + height)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def crop_to_box(image: Image.Image, box: Box, scale: "float | tuple[float, float]" = 1.0) -> Image.Image:
    """Crop ``image`` to ``box`` = ``(left, top, w', h')`` from :func:`prepare_sketch` (the original's
    ``crop_image_from_square``: ``(left, top, left + w', top + h')``).

    ``scale`` multiplies the box (rounded to whole pixels) for an image of another size than the canvas the box
    was computed for: one factor, or ``(sx, sy)`` for the x and y axes (``sx = image width / canvas width``,
    ``sy = image height / canvas height``). The box is clipped to the image.
    """
    left, top, width, height = box
    sx, sy = (float(scale), float(scale)) if isinstance(scale, (int, float)) else (float(scale[0]), float(scale[1]))
    x0, y0 = int(round(left * sx)), int(round(top * sy))
    x1, y1 = int(round((left + width) * sx)), int(round((top + height) * sy))
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box {box} (scale {scale}) is empty for a {image.width}x{image.height} image")
    return image.crop((x0, y0, x1, y1))
