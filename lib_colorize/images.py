"""Decoding user images from every front end (webui components, API JSON, files) into RGB PIL images."""
from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInput

# PIL's own decompression-bomb guard (about 179 Mpx) stays on; our side limit is checked after decoding.


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
    return _to_rgb(image)


def load_image_file(path: "str | os.PathLike[str]", field: str) -> Image.Image:
    """Read an image file for the command line; unreadable or non-image files raise InvalidInput."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InvalidInput(field, f"cannot read {os.fspath(path)}: {error.strerror or error}") from None
    return _to_rgb(_open_bytes(data, field, os.fspath(path)))


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _b64decode(text: str, field: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
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


def _from_array(array: np.ndarray, field: str) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise InvalidInput(field, f"image array has shape {array.shape}; expected HxWx3")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Alpha is composited on white: a transparent sketch background is paper, not black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
