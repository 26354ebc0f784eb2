"""Image decoding against the real webui's own (``CD_WEBUI_DIR``): what the webui accepts for ``init_images`` we
accept for the sketch and the reference, with the same pixels.

The webui's ``modules.api.api.decode_base64_to_image`` and ``modules.images.read`` / ``fix_image`` are compiled from
its source; ours is :func:`lib_colorize.images.decode_image`.
"""
from __future__ import annotations

import base64
import io
import types
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from conftest import real_webui_functions
from lib_colorize.images import decode_image


@pytest.fixture
def webui_decode():
    """``decode_base64_to_image`` of the webui's API, over its ``images.read`` (EXIF transpose, PNG transparency)."""
    namespace = {"Image": Image, "ImageOps": ImageOps}
    read = real_webui_functions("modules/images.py", ["read", "fix_image", "fix_png_transparency"],
                                namespace)["read"]

    class HTTPException(Exception):
        def __init__(self, status_code, detail):
            super().__init__(detail)

    api_namespace = {"base64": base64, "BytesIO": BytesIO, "HTTPException": HTTPException,
                     "images": types.SimpleNamespace(read=read),
                     "opts": types.SimpleNamespace(api_enable_requests=False, api_forbid_local_requests=True)}
    return real_webui_functions("modules/api/api.py", ["decode_base64_to_image"], api_namespace)[
        "decode_base64_to_image"]


def drawing() -> Image.Image:
    image = Image.new("RGB", (48, 32), (250, 250, 240))
    ImageDraw.Draw(image).ellipse((6, 4, 40, 28), outline=(0, 0, 0), width=3)
    ImageDraw.Draw(image).rectangle((0, 0, 8, 31), fill=(200, 30, 30))
    return image


def encoded(image: Image.Image, fmt="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("wrap", ["plain", "mime", "mime-data-url", "data-url"])
def test_base64_forms_the_webui_accepts_decode_to_the_same_pixels(webui_decode, wrap):
    data = encoded(drawing())
    text = (base64.encodebytes(data) if wrap.startswith("mime") else base64.b64encode(data)).decode("ascii")
    if wrap.endswith("data-url"):
        text = "data:image/png;base64," + text
    theirs = webui_decode(text).convert("RGB")
    ours = decode_image(text, "sketch")
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_matches_the_webui(webui_decode, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(drawing(), "JPEG", quality=95, exif=exif.tobytes())
    text = base64.b64encode(data).decode("ascii")
    theirs = webui_decode(text).convert("RGB")
    ours = decode_image(text, "reference")
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
