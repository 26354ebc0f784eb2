"""Decoding user images (lib_colorize.images): 16-bit levels, MIME base64, EXIF orientation, transparent line art.

Real PNG/JPEG bytes, decoded the way every front end decodes them (UI values, API base64, command-line files).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_colorize.errors import InvalidInput
from lib_colorize.images import decode_image, load_image_file
from lib_colorize.options import ColorizeOptions
from lib_colorize.preprocess import prepare_sketch

LEVELS_16 = (0, 16448, 32896, 65535)        # 16-bit levels whose 8-bit equivalents are 0, 64, 128, 255


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    """A 4x1 greyscale PNG with 16 bits per pixel (PIL writes mode I;16 as a 16-bit PNG)."""
    image = Image.fromarray(np.array([LEVELS_16], dtype=np.uint16))
    assert image.mode == "I;16"
    data = png_bytes(image)
    assert data[24] == 16, "the PNG's bit depth must be 16"
    return data


# ------------------------------------------------------------------------------------------- 16 bits
@pytest.mark.parametrize("form", ["base64", "bytes", "file", "pil-I;16", "pil-I", "array"])
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(form, tmp_path):
    data = sixteen_bit_png()
    if form == "base64":
        image = decode_image(base64.b64encode(data).decode("ascii"), "sketch")
    elif form == "bytes":
        image = decode_image(data, "sketch")
    elif form == "file":
        path = tmp_path / "page.png"
        path.write_bytes(data)
        image = load_image_file(path, "sketch")
    elif form == "pil-I;16":
        image = decode_image(Image.fromarray(np.array([LEVELS_16], dtype=np.uint16)), "sketch")
    elif form == "pil-I":
        opened = Image.open(io.BytesIO(data))
        image = decode_image(opened, "sketch")
    else:
        image = decode_image(np.array([LEVELS_16], dtype=np.uint16), "sketch")
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 64, 128, 255]
    assert np.asarray(image)[0, :, 0].tolist() == np.asarray(image)[0, :, 2].tolist()


def test_sixteen_bit_sketch_reaches_the_model_with_its_grey_levels():
    data = base64.b64encode(sixteen_bit_png()).decode("ascii")
    options = ColorizeOptions.from_dict({"enabled": True, "sketch": data})
    tensor, _box = prepare_sketch(options.sketch, "none", (1, 4))
    # to_tensor then [-1, 1]: 0, 64, 128, 255 -> -1, -0.498, 0.004, 1 (clipping gave -1, 1, 1, 1)
    expected = np.array([0, 64, 128, 255]) / 127.5 - 1.0
    assert np.allclose(tensor[0, 0, 0].numpy(), expected, atol=1e-3)


def test_float_and_wide_integer_images():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(decode_image(floats, "sketch"))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(decode_image(np.array([[0.0, 0.25, 1.0]]), "sketch"))[0, :, 0].tolist() == [0, 64, 255]
    assert np.asarray(decode_image(np.array([[0, 100, 255]], dtype=np.int64), "sketch"))[0, :, 0].tolist() \
        == [0, 100, 255]


# --------------------------------------------------------------------------------------- MIME base64
@pytest.mark.parametrize("encode", [base64.encodebytes, lambda b: b"\r\n".join(
    base64.b64encode(b)[i:i + 64] for i in range(0, len(base64.b64encode(b)), 64))])
def test_mime_wrapped_base64_is_accepted(encode):
    source = Image.new("RGB", (64, 48), (10, 200, 30))
    ImageDraw.Draw(source).line((0, 0, 63, 47), fill=(0, 0, 0), width=3)
    data = png_bytes(source)
    wrapped = encode(data).decode("ascii")
    assert "\n" in wrapped
    for text in (wrapped, "data:image/png;base64," + wrapped):
        assert np.array_equal(np.asarray(decode_image(text, "sketch")), np.asarray(source))


def test_base64_with_other_foreign_characters_is_still_refused():
    text = base64.b64encode(png_bytes(Image.new("RGB", (8, 8)))).decode("ascii")
    with pytest.raises(InvalidInput) as error:
        decode_image(text[:20] + "*" + text[20:], "sketch")
    assert error.value.field == "sketch"


# ---------------------------------------------------------------------------------------- EXIF
def exif_rotated_jpeg(orientation: int) -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with the EXIF orientation that makes it upright, and the upright image."""
    upright = Image.new("RGB", (40, 24), (255, 255, 255))
    ImageDraw.Draw(upright).rectangle((0, 0, 9, 23), fill=(0, 0, 0))          # a black bar on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)                     # 24x40, as a phone stores it
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue(), upright


def test_exif_orientation_is_applied_everywhere(tmp_path):
    data, upright = exif_rotated_jpeg(6)        # 6: rotate 90 degrees clockwise to view
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for image in (decode_image(base64.b64encode(data).decode("ascii"), "sketch"), decode_image(data, "reference"),
                  load_image_file(path, "sketch"), decode_image(Image.open(io.BytesIO(data)), "sketch")):
        assert image.size == upright.size
        pixels = np.asarray(image.convert("L"), dtype=np.int16)
        assert np.abs(pixels - np.asarray(upright.convert("L"), dtype=np.int16)).mean() < 8   # JPEG tolerance


# ------------------------------------------------------------------------------- transparent line art
def transparent_line_art(colour) -> Image.Image:
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(image).line((0, 16, 31, 16), fill=colour + (255,), width=2)
    return image


def test_white_lines_on_transparency_stay_visible_in_none_mode():
    sketch = decode_image(transparent_line_art((255, 255, 255)), "sketch")
    assert sketch.getpixel((5, 16)) == (255, 255, 255) and sketch.getpixel((5, 2)) == (0, 0, 0)
    tensor, _ = prepare_sketch(sketch, "none", (32, 32))
    assert float(tensor[0, 0, 16, 5]) == pytest.approx(1.0) and float(tensor[0, 0, 2, 5]) == pytest.approx(-1.0)


def test_dark_lines_on_transparency_get_white_paper():
    sketch = decode_image(transparent_line_art((0, 0, 0)), "sketch")
    assert sketch.getpixel((5, 16)) == (0, 0, 0) and sketch.getpixel((5, 2)) == (255, 255, 255)
    tensor, _ = prepare_sketch(sketch, "invert", (32, 32))
    assert float(tensor[0, 0, 16, 5]) == pytest.approx(1.0) and float(tensor[0, 0, 2, 5]) == pytest.approx(-1.0)


def test_references_are_always_composited_on_white():
    reference = decode_image(transparent_line_art((255, 255, 255)), "reference")
    assert reference.getpixel((5, 2)) == (255, 255, 255)
    assert decode_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "sketch").getpixel((0, 0)) == (255, 255, 255)
