"""Infotext keys <-> options (lib_colorize.infotext), and the webui's "parameters" text format.

The text format is checked three ways: our own formatter/parser round trip, the stand-in
``modules.infotext_utils.parse_generation_parameters`` (an independent re-implementation), and, when the real
webui v1.10.1 source is on this machine, the key/value regex read out of its ``modules/infotext_utils.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import pytest
from PIL import Image

from conftest import real_webui_path
from lib_colorize.errors import InvalidInput
from lib_colorize.infotext import (FIELD_BY_INFOTEXT, INFOTEXT_KEYS, KEY_LAYER_SCALES, KEY_LEVEL_SCALES,
                                   KEY_MANIPULATIONS, KEY_REFERENCE_HASH, KEY_SKETCH_HASH, format_number,
                                   format_parameters_text, has_colorize_params, image_hash, infotext_to_values,
                                   options_to_infotext, parse_parameters_text)
from lib_colorize.options import (FIELDS, LEVEL_NAMES, NUM_ATTENTION_LAYERS, ColorizeOptions, LevelScales,
                                  Manipulation)

KEY_RE = re.compile(r"\w[\w \-/]+\Z")


def _image(color=(200, 30, 40), size=(24, 16)):
    return Image.new("RGB", size, color)


def rich_options() -> ColorizeOptions:
    """Every option away from its default, prompts with the characters that need quoting."""
    return ColorizeOptions(
        enabled=True, sketch=_image((255, 255, 255)), reference=_image(), sketch_mode="extract",
        line_extractor="lineart", reference_guidance=7.5, sketch_guidance=1.3, sketch_strength=0.35,
        reference_strength=0.85, level_scales=LevelScales(0.25, 0.5, 0.75),
        layer_scales=tuple(round(i / 15, 6) for i in range(NUM_ATTENTION_LAYERS)), pad_reference=1.35,
        guidance_start=0.1, guidance_end=0.9, no_guidance_start=0.3, no_guidance_end=0.4, injection=True,
        injection_reference_fidelity=0.65, injection_sketch_fidelity=1.15, injection_start=0.2, crop_result=True,
        style_enhance=True, bg_enhance=True, fg_enhance=True, foreground_strength=0.35, background_strength=0.45,
        merging_scale=0.15, background_factor=1.65, reference_mask_threshold=0.42, sketch_mask_threshold=0.07,
        reference_mask_extractor="rmbg-v2", remove_foreground=True, remove_background=True,
        background=_image((10, 200, 30)), sketch_mask=_image((255, 255, 255)), reference_mask=_image((0, 0, 0)),
        manipulations=(
            Manipulation("red hair, glossy", "blonde: hair", "hair", 2.25, True, (0.4, 0.5, 0.6, 0.9)),
            Manipulation('a "quoted" 青い sky', "none", "sky\\back", 0.0, False, (0.5, 0.55, 0.65, 0.95)),
        ),
    )


def comparable(options: ColorizeOptions) -> ColorizeOptions:
    """What an infotext can restore: no images, no display-only options."""
    return options.replace(sketch=None, reference=None, background=None, sketch_mask=None, reference_mask=None,
                           return_sketch=False, return_heatmap=False, return_masks=False)


def restore(text: str) -> ColorizeOptions:
    return ColorizeOptions.from_dict(infotext_to_values(parse_parameters_text(text)), require_sketch=False)


def full_text(options: ColorizeOptions) -> str:
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1234,
              "Size": "512x768", "Model": "mult-eps-ft"}
    params.update(options_to_infotext(options))
    return format_parameters_text("masterpiece, 1girl: smiling\nsecond line", params,
                                  negative_prompt="lowres, bad hands")


# --------------------------------------------------------------------------------------------- writing
def test_keys_follow_the_webui_key_grammar():
    for key in INFOTEXT_KEYS:
        assert KEY_RE.match(key), key
        assert key.startswith("CD ") and "." not in key
    written = options_to_infotext(rich_options())
    assert set(written) <= set(INFOTEXT_KEYS)
    # every key is written for the rich options (all conditions met)
    assert set(written) == set(INFOTEXT_KEYS)


def test_disabled_writes_nothing():
    assert options_to_infotext(ColorizeOptions()) == {}
    assert options_to_infotext(rich_options().replace(enabled=False)) == {}


def test_values_and_conditional_keys():
    written = options_to_infotext(rich_options())
    assert written["CD enabled"] is True
    assert written["CD reference guidance"] == 7.5 and isinstance(written["CD reference guidance"], float)
    assert written["CD sketch mode"] == "extract" and written["CD line extractor"] == "lineart"
    assert written[KEY_LEVEL_SCALES] == "0.25/0.5/0.75"
    assert written[KEY_LAYER_SCALES].count(",") == NUM_ATTENTION_LAYERS - 1
    groups = json.loads(written[KEY_MANIPULATIONS])
    assert groups[0] == {"target": "red hair, glossy", "anchor": "blonde: hair", "control": "hair", "scale": 2.25,
                         "enhance": True, "thresholds": [0.4, 0.5, 0.6, 0.9]}
    assert re.fullmatch(r"[0-9a-f]{10}", written[KEY_SKETCH_HASH])

    plain = options_to_infotext(ColorizeOptions(enabled=True, sketch=_image()))
    for key in ("CD line extractor", "CD injection reference fidelity", "CD injection sketch fidelity",
                "CD injection start", KEY_LAYER_SCALES, KEY_MANIPULATIONS, KEY_REFERENCE_HASH):
        assert key not in plain, key
    assert plain["CD injection"] is False and plain[KEY_LEVEL_SCALES] == "1/1/1"
    assert "CD return sketch" not in plain


def test_inactive_manipulations_are_not_written():
    options = ColorizeOptions(enabled=True, manipulations=(Manipulation("red", "none", "hair", 0.0),))
    assert KEY_MANIPULATIONS not in options_to_infotext(options)


def test_image_hash_is_of_pixels():
    a = _image()
    assert image_hash(a) == image_hash(a.copy()) == image_hash(a.convert("RGBA"))
    assert image_hash(a) != image_hash(_image((200, 30, 41)))
    assert image_hash(a) != image_hash(_image(size=(16, 24)))
    assert image_hash(None) is None


@pytest.mark.parametrize("value,text", [(1.0, "1"), (0.35, "0.35"), (-0.05, "-0.05"), (1 / 3, repr(1 / 3))])
def test_format_number(value, text):
    assert format_number(value) == text
    assert float(text) == value


# ---------------------------------------------------------------------------------------- round trips
def test_round_trip_through_parameters_text_is_exact():
    options = rich_options()
    text = full_text(options)
    assert "\n" in text and text.count("\n") == 3         # prompt (2 lines), negative, parameters
    assert restore(text) == comparable(options)


def test_round_trip_of_random_options():
    rng = random.Random(7)
    for _ in range(40):
        values = {}
        for spec in FIELDS:
            if spec.kind is float:
                values[spec.name] = rng.uniform(spec.minimum, spec.maximum)
            elif spec.kind is bool:
                values[spec.name] = rng.random() < 0.5
            elif spec.choices:
                values[spec.name] = rng.choice(spec.choices)
        values.update(enabled=True, injection=True, sketch_mode="extract", bg_enhance=True)
        start, end = sorted((values["guidance_start"], values["guidance_end"]))
        values["guidance_start"], values["guidance_end"] = start, end
        start, end = sorted((values["no_guidance_start"], values["no_guidance_end"]))
        values["no_guidance_start"], values["no_guidance_end"] = start, end
        values["level_scales"] = {n: rng.random() for n in LEVEL_NAMES}
        values["layer_scales"] = [rng.random() for _ in range(NUM_ATTENTION_LAYERS)] if rng.random() < 0.5 else None
        values["manipulations"] = [{"target": f"t{i}, x", "anchor": "none", "control": f"c:{i}",
                                    "scale": rng.uniform(0.01, 15), "enhance": bool(i % 2),
                                    "thresholds": sorted(rng.sample([0.1, 0.2, 0.3, 0.5, 0.7, 0.9], 4))}
                                   for i in range(rng.randrange(0, 4))]
        options = ColorizeOptions.from_dict(values, require_sketch=False)
        assert restore(full_text(options)) == comparable(options)


def test_ineffective_options_come_back_as_defaults():
    options = ColorizeOptions(enabled=True, sketch=_image(), injection=False, injection_start=0.5,
                              sketch_mode="invert", line_extractor="lineart")
    restored = restore(full_text(options))
    assert restored.injection_start == 0.0 and restored.line_extractor == "lineart_keras"
    assert restored == comparable(options).replace(injection_start=0.0, line_extractor="lineart_keras")


def test_stand_in_webui_parser_reads_the_same_values():
    from modules import infotext_utils

    text = full_text(rich_options())
    ours = parse_parameters_text(text)
    theirs = infotext_utils.parse_generation_parameters(text)
    for key in INFOTEXT_KEYS:
        assert ours.get(key) == theirs.get(key), key
    assert ours["Prompt"] == theirs["Prompt"] == "masterpiece, 1girl: smiling\nsecond line"
    assert ours["Negative prompt"] == theirs["Negative prompt"] == "lowres, bad hands"
    assert infotext_to_values(theirs) == infotext_to_values(ours)


def test_real_webui_regex_reads_our_parameters_line():
    source = real_webui_path("modules/infotext_utils.py").read_text(encoding="utf-8")
    match = re.search(r"^re_param_code = r'(.*)'$", source, re.M)
    assert match, "re_param_code not found in the webui source"
    webui_re = re.compile(match.group(1))
    last_line = full_text(rich_options()).split("\n")[-1]
    pairs = {k: (json.loads(v) if v.startswith('"') and v.endswith('"') else v)
             for k, v in webui_re.findall(last_line)}
    ours = parse_parameters_text(full_text(rich_options()))
    for key in INFOTEXT_KEYS:
        assert pairs[key] == ours[key], key


# ---------------------------------------------------------------------------------------- tolerance
def test_missing_keys_take_defaults():
    defaults = ColorizeOptions()
    values = infotext_to_values({"Steps": "20", "CD reference guidance": "3"})
    assert values["enabled"] is True and values["reference_guidance"] == 3.0
    assert ColorizeOptions.from_dict(values, require_sketch=False) == defaults.replace(enabled=True,
                                                                                       reference_guidance=3.0)
    values = infotext_to_values({"Steps": "20", "Sampler": "Euler"})
    assert values["enabled"] is False and not has_colorize_params({"Steps": "20"})
    assert ColorizeOptions.from_dict(values) == defaults


def test_explicitly_disabled():
    assert infotext_to_values({"CD enabled": "False"})["enabled"] is False


@pytest.mark.parametrize("key,value,field", [
    ("CD reference guidance", "abc", "reference_guidance"),
    ("CD reference guidance", "99", "reference_guidance"),
    ("CD sketch guidance", "nan", "sketch_guidance"),
    ("CD sketch mode", "pencil", "sketch_mode"),
    ("CD injection", "maybe", "injection"),
    (KEY_LEVEL_SCALES, "1/1", "level_scales"),
    (KEY_LEVEL_SCALES, "1/2/1", "level_scales.middle"),
    (KEY_LAYER_SCALES, "1,1,1", "layer_scales"),
    (KEY_MANIPULATIONS, "[{", "manipulations"),
    (KEY_MANIPULATIONS, '[{"target":"a","scale":99}]', "manipulations[0].scale"),
])
def test_malformed_values(key, value, field):
    params = {"CD enabled": "True", key: value}
    with pytest.raises(InvalidInput) as error:
        infotext_to_values(params)
    assert error.value.field == field
    lenient = infotext_to_values(params, strict=False)
    spec = FIELD_BY_INFOTEXT.get(key)
    if spec is not None:
        assert lenient[spec.name] == spec.default
    assert lenient["enabled"] is True


# ------------------------------------------------------------------------------------ the text format
def test_format_parameters_text_layout():
    text = format_parameters_text("a cat", {"Steps": 20, "CD reference guidance": 5.0, "Flag": "Flag",
                                            "Skip": None, "List": "a,b", "CD enabled": True},
                                  negative_prompt="dog")
    assert text == 'a cat\nNegative prompt: dog\nSteps: 20, CD reference guidance: 5.0, Flag, List: "a,b", ' \
                   'CD enabled: True'
    assert format_parameters_text("", {"Steps": 20, "Seed": 1, "Size": "64x64"}) == "Steps: 20, Seed: 1, Size: 64x64"
    with pytest.raises(ValueError):
        format_parameters_text("", {"CD 0.down0": 1})


def test_parse_parameters_text_details():
    parsed = parse_parameters_text("Steps: 20, Seed: 5, Size: 640x512, Note: \"x, y: z\"")
    assert parsed["Size"] == "640x512" and parsed["Size-1"] == "640" and parsed["Size-2"] == "512"
    assert parsed["Note"] == "x, y: z" and parsed["Prompt"] == "" and parsed["Negative prompt"] == ""
    # fewer than three pairs: the last line is part of the prompt (the webui's rule)
    parsed = parse_parameters_text("a cat\nstyle: oil")
    assert parsed["Prompt"] == "a cat\nstyle: oil" and "style" not in parsed
    assert parse_parameters_text("")["Prompt"] == ""


def test_cli_style_text_without_prompt():
    options = rich_options()
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 3, "Size": "512x512"}
    params.update(options_to_infotext(options))
    text = format_parameters_text("", params)
    parsed = parse_parameters_text(text)
    assert parsed["Steps"] == "20" and parsed["Size"] == "512x512"
    assert ColorizeOptions.from_dict(infotext_to_values(parsed), require_sketch=False) == comparable(options)
    assert not math.isnan(float(parsed["CD sketch strength"]))
    assert dataclasses.asdict(options.level_scales) == infotext_to_values(parsed)["level_scales"]
