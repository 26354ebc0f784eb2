"""Validation of the one argument object shared by the UI, the API and the CLI: every bad input gets an
InvalidInput that names its field and says what is allowed."""
from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from lib_colorize.errors import InvalidInput
from lib_colorize.images import decode_image, encode_png_base64
from lib_colorize.options import (ALL_KEYS, IMAGE_FIELDS, DEFAULT_THRESHOLDS, FIELDS, ColorizeOptions, LevelScales,
                                  Manipulation, check_prompt_tokens)


def png_b64(size=(32, 24), colour=(255, 255, 255), mode="RGB") -> str:
    return encode_png_base64(Image.new(mode, size, colour))


GOOD = {"enabled": True, "sketch": png_b64(), "reference": png_b64(colour=(200, 10, 10))}

BAD_INPUTS = [
    # (changes to GOOD, field named, words in the message)
    ({"sketch": None}, "sketch", "no sketch"),
    ({"sketch": "%%%not base64%%%"}, "sketch", "not valid base64"),
    ({"sketch": base64.b64encode(b"plain text, not an image").decode()}, "sketch", "not a readable image"),
    ({"reference": 12}, "reference", "expected an image"),
    ({"sketch": png_b64(size=(5000, 10))}, "sketch", "at most 4096"),
    ({"reference_guidance": float("nan")}, "reference_guidance", "finite"),
    ({"reference_guidance": float("inf")}, "reference_guidance", "finite"),
    ({"reference_guidance": 0.5}, "reference_guidance", "out of range [1, 15]"),
    ({"sketch_strength": -1}, "sketch_strength", "out of range"),
    ({"sketch_guidance": "strong"}, "sketch_guidance", "expected a number"),
    ({"sketch_guidance": True}, "sketch_guidance", "expected a number"),
    ({"injection": "yes please"}, "injection", "true or false"),
    ({"sketch_mode": "colour"}, "sketch_mode", "not one of none, invert, extract"),
    ({"line_extractor": "../../etc/passwd"}, "line_extractor", "not one of"),
    ({"nonsense": 1, "more": 2}, "more", "unknown option(s) more, nonsense"),
    ({"level_scales": {"encoder": 2}}, "level_scales.encoder", "out of range"),
    ({"level_scales": {"top": 1}}, "level_scales", "unknown key"),
    ({"layer_scales": [1] * 15}, "layer_scales", "expected 16 numbers, got 15"),
    ({"layer_scales": [1] * 15 + [-0.1]}, "layer_scales[15]", "out of range"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start", "must not exceed"),
    ({"manipulations": {"target": "x"}}, "manipulations", "list"),
    ({"manipulations": [{"target": "x"}] * 17}, "manipulations", "at most 16"),
    ({"manipulations": [{"target": "x", "thresholds": [0.5, 0.5, 0.6, 0.9]}]}, "manipulations[0].thresholds",
     "strictly increasing"),
    ({"manipulations": [{"target": "x", "thresholds": [0.0, 0.5, 0.6, 0.9]}]}, "manipulations[0].thresholds",
     "strictly increasing"),
    ({"manipulations": [{"target": "x", "scale": 16}]}, "manipulations[0].scale", "out of range"),
    ({"manipulations": [{"target": "x" * 1001}]}, "manipulations[0].target", "at most 1000"),
    ({"manipulations": [{"colour": "x"}]}, "manipulations[0]", "unknown key(s) colour"),
]


@pytest.mark.parametrize("changes,field,words", BAD_INPUTS, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_their_field(changes, field, words):
    with pytest.raises(InvalidInput) as info:
        ColorizeOptions.from_dict({**GOOD, **changes})
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith("ColorizeDiffusion: ")


def test_not_a_dict():
    with pytest.raises(InvalidInput, match="expected a JSON object"):
        ColorizeOptions.from_dict(["enabled", True])


def test_defaults_equal_the_field_table_and_omitted_keys_take_them():
    options = ColorizeOptions.from_dict(GOOD)
    for spec in FIELDS:
        if spec.name != "enabled":
            assert getattr(options, spec.name) == spec.default, spec.name
    assert options.level_scales == LevelScales() and options.layer_scales is None and options.manipulations == ()
    assert set(options.to_dict()) == set(ALL_KEYS) - set(IMAGE_FIELDS)


def test_good_values_parse_exactly():
    options = ColorizeOptions.from_dict({
        **GOOD, "reference_guidance": 7, "level_scales": {"middle": 0.4}, "layer_scales": "0.5," * 15 + "1",
        "manipulations": [{"target": "red hair", "control": "hair", "scale": 3, "enhance": "true"}]})
    assert options.reference_guidance == 7.0
    assert options.level_scales == LevelScales(encoder=1.0, middle=0.4, low=1.0)
    assert options.layer_scales == (0.5,) * 15 + (1.0,)
    assert options.manipulations == (Manipulation("red hair", "none", "hair", 3.0, True, DEFAULT_THRESHOLDS),)
    assert options.sketch.size == (32, 24) and options.sketch.mode == "RGB"


def test_active_manipulations_need_a_positive_scale():
    zero = ColorizeOptions.from_dict({**GOOD, "manipulations": [{"target": "a"}, {"target": "b"}]})
    assert zero.active_manipulations == ()
    one = zero.replace(manipulations=zero.manipulations + (Manipulation(target="c", scale=1.0),))
    assert len(one.active_manipulations) == 3   # all groups apply once any scale is > 0 (method §7)


def test_disabled_needs_no_sketch_and_img2img_may_supply_it_later():
    assert not ColorizeOptions.from_dict({"enabled": False}).enabled
    options = ColorizeOptions.from_dict({"enabled": True}, require_sketch=False)
    assert options.sketch is None


def test_over_long_prompts_are_refused_with_the_limit():
    options = ColorizeOptions(manipulations=(Manipulation(target="word " * 80, control="hair", scale=1),))
    with pytest.raises(InvalidInput) as info:
        check_prompt_tokens(options, lambda text: len(text.split()))
    assert info.value.field == "manipulations[0].target" and "at most 75" in str(info.value)


def test_decode_image_forms():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    decoded = decode_image("data:image/png;base64," + encode_png_base64(rgba), "sketch")
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255), "transparent = white paper"
    assert decode_image({"image": rgba, "mask": None}, "sketch").size == (4, 4)
    assert decode_image(np.zeros((3, 5), np.uint8), "sketch").size == (5, 3)
    raw = io.BytesIO()
    Image.new("L", (2, 2), 128).save(raw, format="JPEG")
    assert decode_image(raw.getvalue(), "reference").mode == "RGB"
    with pytest.raises(InvalidInput, match="no 'image' entry"):
        decode_image({"mask": 1}, "sketch")
    with pytest.raises(InvalidInput, match="empty image string"):
        decode_image("   ", "sketch")
    # a path is never opened: "/etc/hostname" is not base64 of an image
    with pytest.raises(InvalidInput):
        decode_image("/etc/hostname", "sketch")


def test_out_of_range_values_are_quoted_without_rounding_onto_the_bound():
    from lib_colorize.errors import InvalidInput

    with pytest.raises(InvalidInput) as error:
        ColorizeOptions.from_dict({"pad_reference": 2.0000001})
    assert "2.0000001 is out of range [1, 2]" in str(error.value)
    with pytest.raises(InvalidInput) as error:
        ColorizeOptions.from_dict({"reference_guidance": 20})
    assert "20 is out of range [1, 15]" in str(error.value)
