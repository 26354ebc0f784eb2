"""Sketch / reference preprocessing and output conversion (method §8; §10.3 item 14).

The original helpers (``preprocess_sketch``, ``pad_image``, ``pad_image_with_margin``, ``crop_image_from_square``,
``to_tensor``, ``to_numpy`` in tellurion-kanata/colorizeDiffusion ``libs/functool.py``) cannot be imported in CI;
the expected geometry below restates method §8.2-§8.5 by hand (r = min(H/h0, W/w0), w' = int(w0 r),
h' = int(h0 r), left = (W - w') // 2, top = (H - h') // 2). Crop boxes and pixel geometry are compared exactly,
tensor values with max |Δ| <= 1e-6 (method §10.4).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from lib_colorize.errors import InvalidInput
from lib_colorize.preprocess import (
    check_resolution, crop_to_box, default_size_for, image_to_tensor, pad_reference_with_margin, prepare_sketch,
    reference_for_injection, round_to_multiple_of_64, tensor_to_images)


def drawing(width: int, height: int, seed: int = 0) -> Image.Image:
    """Black strokes on white paper, with some grey levels."""
    rng = np.random.default_rng(seed)
    arr = np.full((height, width, 3), 255, np.uint8)
    for _ in range(12):
        y = int(rng.integers(0, height))
        arr[y, :, :] = rng.integers(0, 120)
        x = int(rng.integers(0, width))
        arr[:, x, :] = rng.integers(0, 120)
    return Image.fromarray(arr)


def expected_box(sketch_wh, size_hw):
    w0, h0 = sketch_wh
    H, W = size_hw
    r = min(H / h0, W / w0)
    w1, h1 = int(w0 * r), int(h0 * r)
    return ((W - w1) // 2, (H - h1) // 2, w1, h1)


# ------------------------------------------------------------------------------------ conversion (§8.1)
def test_image_to_tensor_range_and_layout():
    arr = np.array([[[0, 255, 128], [64, 32, 16]]], np.uint8)  # 1 x 2 image
    x = image_to_tensor(Image.fromarray(arr))
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    expected = torch.from_numpy(arr.astype(np.float64) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
    assert (x.double() - expected).abs().max() <= 1e-6
    grey = image_to_tensor(Image.fromarray(arr).convert("L"))
    assert grey.shape == (1, 3, 1, 2)
    transparent = image_to_tensor(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert torch.equal(transparent, torch.ones(1, 3, 2, 2))  # transparency is white paper, not black


def test_tensor_to_images_clamps_and_truncates():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, -0.5])
    x = values.reshape(1, 1, 1, -1).expand(2, 3, 1, -1).clone()
    images = tensor_to_images(x)
    assert len(images) == 2 and images[0].size == (7, 1) and images[0].mode == "RGB"
    got = np.asarray(images[1])[0, :, 0].tolist()
    # (clamp(x) + 1) * 127.5, truncated: 0 -> 127 (127.5), 0.999 -> 254 (254.87), -0.5 -> 63 (63.75)
    assert got == [0, 0, 127, 254, 255, 255, 63]
    assert np.asarray(tensor_to_images(x.half())[0]).tolist() == np.asarray(images[0]).tolist()


# ------------------------------------------------------------------------------------ resolution (§8.4)
@pytest.mark.parametrize("width,height,field", [(500, 512, "width"), (512, 520, "height"), (0, 512, "width"),
                                                (512, 32, "height"), (512.5, 512, "width")])
def test_check_resolution_errors(width, height, field):
    with pytest.raises(InvalidInput) as info:
        check_resolution(width, height)
    assert info.value.field == field
    assert "64" in info.value.message or "whole number" in info.value.message


def test_check_resolution_accepts_multiples():
    for w, h in [(512, 512), (512, 768), (64, 1280), (1536, 64)]:
        check_resolution(w, h)


def test_round_to_multiple_of_64_and_default_size():
    assert round_to_multiple_of_64(500, 700) == (512, 704)
    assert round_to_multiple_of_64(10, 95) == (64, 64)
    assert round_to_multiple_of_64(512, 768) == (512, 768)
    assert default_size_for((1000, 1000)) == (512, 512)
    assert default_size_for((600, 900)) == (448, 640)       # 512*sqrt(2/3)=418 -> 448, 512*sqrt(1.5)=627 -> 640
    assert default_size_for((1600, 900)) == (704, 384)      # 682.7 -> 704, 384
    assert default_size_for((768, 512), native=768) == (960, 640)
    w, h = default_size_for((10, 4000))
    assert (w, h) == (64, 2048)
    for size in [(1000, 1000), (600, 900), (1600, 900), (123, 457)]:
        w, h = default_size_for(size)
        check_resolution(w, h)


def test_one_given_side_keeps_the_sketch_aspect_for_the_other():
    assert default_size_for((1600, 900), width=1024) == (1024, 576)      # 1024 * 900/1600 = 576
    assert default_size_for((600, 900), height=768) == (512, 768)        # 768 * 600/900 = 512
    assert default_size_for((1000, 1000), width=320) == (320, 320)
    assert default_size_for((700, 1000), width=128) == (128, 192)        # 182.9 -> 192
    assert default_size_for((10, 4000), width=64) == (64, 2048)          # kept within max_side
    assert default_size_for((1600, 900), width=256, height=640) == (256, 640)


# ---------------------------------------------------------------------------------------- sketch (§8.2)
SKETCH_SIZES = [(1000, 500), (300, 600), (400, 400), (513, 341)]   # landscape, portrait, square, odd
CANVASES = [(512, 512), (768, 512), (512, 768)]                    # (H, W)


@pytest.mark.parametrize("sketch_wh", SKETCH_SIZES)
@pytest.mark.parametrize("size_hw", CANVASES)
def test_prepare_sketch_box_geometry(sketch_wh, size_hw):
    sketch = drawing(*sketch_wh)
    x, box = prepare_sketch(sketch, "invert", size_hw)
    H, W = size_hw
    assert x.shape == (1, 3, H, W) and x.dtype == torch.float32
    assert box == expected_box(sketch_wh, size_hw)
    left, top, w1, h1 = box
    # the sketch fills its box along the limiting side, and is centred along the other
    assert w1 == W or h1 == H
    assert abs((W - w1) - 2 * left) <= 1 and abs((H - h1) - 2 * top) <= 1
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[top:top + h1, left:left + w1] = False
    assert torch.equal(x[0][:, outside], -torch.ones_like(x[0][:, outside]))
    # inside: torchvision bicubic antialias Resize of the inverted tensor, not clamped
    inv = -image_to_tensor(sketch)
    resized = T.Resize((h1, w1), interpolation=T.InterpolationMode.BICUBIC, antialias=True)(inv)
    assert (x[:, :, top:top + h1, left:left + w1] - resized).abs().max() <= 1e-6


def test_prepare_sketch_known_boxes():
    """Hand-computed boxes (method §8.2) for the canvases named in §10.3 item 2/14."""
    assert prepare_sketch(drawing(1000, 500), "invert", (512, 512))[1] == (0, 128, 512, 256)
    assert prepare_sketch(drawing(300, 600), "invert", (512, 512))[1] == (128, 0, 256, 512)
    assert prepare_sketch(drawing(400, 400), "invert", (768, 512))[1] == (0, 128, 512, 512)
    assert prepare_sketch(drawing(400, 400), "invert", (512, 768))[1] == (128, 0, 512, 512)
    assert prepare_sketch(drawing(1000, 500), "none", (768, 512))[1] == (0, 256, 512, 256)


def test_prepare_sketch_invert_is_negated_none():
    sketch = drawing(640, 480, seed=3)
    a, box_a = prepare_sketch(sketch, "none", (512, 768))
    b, box_b = prepare_sketch(sketch, "invert", (512, 768))
    assert box_a == box_b
    left, top, w1, h1 = box_a
    inner = (slice(None), slice(None), slice(top, top + h1), slice(left, left + w1))
    assert torch.equal(b[inner], -a[inner])
    # black strokes on white paper become white lines on a black (-1) background
    assert float(b[inner].median()) == pytest.approx(-1.0, abs=1e-3)
    assert float(b[inner].max()) > 0.0
    # the padding (43 columns each side here) is -1 in both modes, not negated
    assert box_a == (43, 0, 682, 512)
    assert torch.equal(a[..., :left], -torch.ones_like(a[..., :left]))
    assert torch.equal(b[..., :left], -torch.ones_like(b[..., :left]))


def test_prepare_sketch_same_size_keeps_values():
    sketch = drawing(512, 512, seed=5)
    x, box = prepare_sketch(sketch, "invert", (512, 512))
    assert box == (0, 0, 512, 512)
    assert (x + image_to_tensor(sketch)).abs().max() <= 1e-6


def test_prepare_sketch_blank():
    x, box = prepare_sketch(None, "invert", (512, 768))
    assert x.shape == (1, 3, 512, 768)
    assert torch.equal(x, -torch.ones_like(x))
    assert box == (0, 0, 768, 512)


def test_prepare_sketch_extract_calls_extractor_on_square():
    calls = []

    def extractor(image, m):
        calls.append((image.size, m))
        return torch.linspace(-1, 1, m * m).reshape(1, 1, m, m).repeat(1, 3, 1, 1)

    sketch = drawing(300, 600)
    x, box = prepare_sketch(sketch, "extract", (512, 768), extractor)
    assert calls == [((768, 768), 768)]
    assert box == expected_box((300, 600), (512, 768)) == (256, 0, 256, 512)
    left, top, w1, h1 = box
    square = torch.linspace(-1, 1, 768 * 768).reshape(1, 1, 768, 768).repeat(1, 3, 1, 1)
    resized = T.Resize((h1, w1), interpolation=T.InterpolationMode.BICUBIC, antialias=True)(square)
    assert (x[:, :, top:top + h1, left:left + w1] - resized).abs().max() <= 1e-6
    with pytest.raises(ValueError):
        prepare_sketch(sketch, "extract", (512, 512), None)


def test_prepare_sketch_unknown_mode():
    with pytest.raises(InvalidInput) as info:
        prepare_sketch(drawing(64, 64), "sharpen", (512, 512))
    assert info.value.field == "sketch_mode"


# ------------------------------------------------------------------------------------- reference (§8.3)
def test_pad_reference_with_margin_geometry():
    ref = Image.new("RGB", (101, 40), (200, 10, 10))
    assert pad_reference_with_margin(ref, 1.0) is ref
    padded = pad_reference_with_margin(ref, 1.5)
    new_w = int(101 * 1.5)
    assert padded.size == (new_w, 40)            # width only; height unchanged
    left = (new_w - 101) // 2
    arr = np.asarray(padded)
    assert (arr[:, :left] == 255).all()
    assert (arr[:, left + 101:] == 255).all()
    assert (arr[:, left:left + 101] == (200, 10, 10)).all()
    odd = pad_reference_with_margin(ref, 1.05)
    assert odd.size == (int(101 * 1.05), 40)
    assert (np.asarray(odd)[:, (int(101 * 1.05) - 101) // 2] == (200, 10, 10)).all()
    with pytest.raises(InvalidInput):
        pad_reference_with_margin(ref, 0.5)


def test_reference_for_injection_exact_resize():
    ref = drawing(300, 200, seed=7).convert("RGB")
    x = reference_for_injection(ref, (512, 768))
    assert x.shape == (1, 3, 512, 768)
    expected = image_to_tensor(ref.resize((768, 512), Image.BICUBIC))
    assert (x - expected).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------- output (§8.5)
def test_crop_to_box_round_trip():
    sketch = drawing(1000, 500)
    x, box = prepare_sketch(sketch, "invert", (512, 512))
    (image,) = tensor_to_images(x)
    cropped = crop_to_box(image, box)
    assert cropped.size == (512, 256)
    # the crop holds exactly the sketch region, none of the -1 (black) padding rows
    left, top, w1, h1 = box
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[top:top + h1, left:left + w1])
    big = image.resize((1024, 1024))
    assert crop_to_box(big, box, scale=2.0).size == (1024, 512)
    assert np.array_equal(np.asarray(crop_to_box(big, box, 2.0)), np.asarray(big)[256:768, 0:1024])
    full = crop_to_box(image, (0, 0, 512, 512))
    assert full.size == image.size
