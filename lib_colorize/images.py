"""Decoding user images from every front end (webui components, API JSON, files) into RGB PIL images.

Every image goes through :func:`decode_image` (the command line through :func:`load_image_file`), which applies,
in this order:

1. **EXIF orientation** (``ImageOps.exif_transpose``): a phone photo of a drawing is upright, as in the webui;
2. **8 bits per channel**: 16-bit greyscale (``I;16*``, and ``I``, PIL's mode for 16-bit PNG and TIFF) is scaled by
   ``255 / 65535`` and rounded, not clipped; float images (``F``) in [0, 1] are scaled by 255 (others are read as
   8-bit levels); 16-bit RGB(A) PNGs already arrive as 8 bits from PIL;
3. **transparency** is composited over a matte (:func:`matte_for`): white paper for references, and for a sketch
   the colour that keeps its lines visible;
4. **RGB**.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput

# PIL's own decompression-bomb guard (about 179 Mpx) stays on; our side limit is checked after decoding.

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
#: Fields holding line art: their transparency is composited over the colour that keeps the lines visible.
LINE_ART_FIELDS = ("sketch",)
#: Greyscale modes PIL uses for 16 bits per pixel (``I`` is how PIL 9 opens 16-bit PNG and TIFF greyscale).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_TO_EIGHT = 255.0 / 65535.0


def decode_image(value: Any, field: str) -> Image.Image:
    """Turn an image given as PIL image, numpy array, gradio dict, base64 string / data URL or bytes into RGB.

    Never treats a string as a path: API callers must not be able to read files on the server.
    """
    if isinstance(value, dict):
        # gradio sketch/inpaint tools deliver {"image": ..., "mask": ...}; ControlNet-style API dicts as well.
        if "image" not in value:
            raise InvalidInput(field, "image object has no 'image' entry")
        value = value["image"]
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = _from_array(value, field)
    elif isinstance(value, (bytes, bytearray)):
        image = _open_bytes(bytes(value), field)
    elif isinstance(value, str):
        image = _open_bytes(_b64decode(value, field), field)
    else:
        raise InvalidInput(field, f"expected an image (base64 PNG/JPEG string), got {type(value).__name__}")
    return _to_rgb(image, field)


def load_image_file(path: "str | os.PathLike[str]", field: str) -> Image.Image:
    """Read an image file for the command line; unreadable or non-image files raise InvalidInput."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InvalidInput(field, f"cannot read {os.fspath(path)}: {error.strerror or error}") from None
    return _to_rgb(_open_bytes(data, field, os.fspath(path)), field)


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _b64decode(text: str, field: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    # MIME base64 (a line break every 76 characters: base64.encodebytes, the base64 tool) is valid base64; the
    # webui accepts it for init_images. Only whitespace is dropped: anything else outside the alphabet is refused.
    text = "".join(text.split())
    if not text:
        raise InvalidInput(field, "empty image string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(field, "is not valid base64 (expected a base64-encoded PNG/JPEG or a data URL)") from None


def _open_bytes(data: bytes, field: str, source: str = "data") -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise InvalidInput(field, f"{source} is not a readable image (not a PNG, JPEG, WebP or BMP file)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidInput(field, f"{source} is not a readable image ({type(error).__name__}: {error})") from None
    return image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Levels of a numeric array as 8 bits: ``uint16`` (and wider integers holding values above 255) scaled by
    255/65535, floats in [0, 1] by 255, booleans to 0/255; other values are 8-bit levels, clipped to [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = np.nan_to_num(array.astype(np.float64))
    peak = float(values.max()) if values.size else 0.0
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and peak > 255):
        values = values * _SIXTEEN_TO_EIGHT
    elif np.issubdtype(array.dtype, np.floating) and peak <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray, field: str) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise InvalidInput(field, f"image array has shape {array.shape}; expected HxWx3")
    array = _to_uint8(array)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array))


def _eight_bit(image: Image.Image) -> Image.Image:
    """The image with 8 bits per channel (see the module notes); other modes are returned as they are."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64) * _SIXTEEN_TO_EIGHT
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float32)), "L")
    if image.mode == "La":   # premultiplied alpha that PIL converts only to LA
        return image.convert("LA")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info


def matte_for(rgba: Image.Image, field: str) -> tuple:
    """The colour transparent pixels become.

    References: white paper. Line art (:data:`LINE_ART_FIELDS`): the colour opposite to what is drawn, so that the
    lines stay visible -- black when the visible pixels are light (their alpha-weighted mean luminance is above
    half: white lines, the ``none`` sketch mode's convention), white otherwise (dark lines on paper). A fully
    transparent image gets white.
    """
    if field not in LINE_ART_FIELDS:
        return WHITE
    array = np.asarray(rgba, dtype=np.float64)
    alpha = array[..., 3] / 255.0
    weight = float(alpha.sum())
    if weight <= 0.0:
        return WHITE
    luminance = array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114
    return BLACK if float((luminance * alpha).sum()) / weight > 127.5 else WHITE


def _to_rgb(image: Image.Image, field: str = "image") -> Image.Image:
    """Upright, 8 bits per channel, transparency composited over :func:`matte_for`, RGB."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the image as it is (as the webui does)
        pass
    image = _eight_bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, matte_for(rgba, field) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
