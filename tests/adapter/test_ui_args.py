"""The accordion (cd_webui.ui.build_ui) and the script-args parser (cd_webui.args.parse_script_args).

Built with the real gradio 3.41.2 inside ``gr.Blocks`` against the stand-in ``modules.ui_components``.
"""
from __future__ import annotations

import base64
import io
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

import cd_webui
from cd_webui import ui as cd_ui
from cd_webui.args import (ACCURATE_SLOT, FORM_SLOTS, FORM_TARGET_SLOT, INFOTEXT_ENABLED_SLOT, LAYER_SLOTS,
                           LEVEL_SLOTS, MANIPULATIONS_SLOT, SLOT_INDEX, UI_ORDER,
                           USE_INIT_IMAGE_SLOT, level_override_attr, override_attr, parse_script_args, ui_defaults)
from conftest import real_webui_functions, real_webui_path
from lib_colorize.errors import ColorizeError, InvalidInput
from lib_colorize.infotext import format_parameters_text, options_to_infotext
from lib_colorize.manipulation import format_manipulation_sequence
from lib_colorize.options import (DEFAULT_THRESHOLDS, FIELD_BY_NAME, FIELDS, NUM_ATTENTION_LAYERS, ColorizeOptions,
                                  LevelScales, Manipulation)

REPO = Path(__file__).resolve().parents[2]


class FakeScript:
    """Just what build_ui uses of modules.scripts.Script (title, elem_id, the two attributes it sets)."""

    infotext_fields = None
    paste_field_names = None

    def __init__(self, is_img2img=False):
        self.is_img2img = is_img2img

    def title(self):
        return "ColorizeDiffusion"

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        return f"script_{tab}_colorizediffusion_{item_id}"


def build(is_img2img=False):
    script = FakeScript(is_img2img)
    with gr.Blocks():
        components = cd_ui.build_ui(script, is_img2img)
    return script, components


def png_b64(image: Image.Image, data_url=False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def sketch_image():
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))        # transparent paper
    for x in range(5, 35):
        image.putpixel((x, 15), (0, 0, 0, 255))               # one black line
    return image


def reference_image():
    return Image.new("RGB", (32, 32), (10, 120, 220))


def rich_options(**changes) -> ColorizeOptions:
    options = ColorizeOptions(
        enabled=True, sketch=sketch_image(), reference=reference_image(), sketch_mode="extract",
        line_extractor="lineart_denoise", reference_guidance=7.5, sketch_guidance=1.5, sketch_strength=0.7,
        reference_strength=0.8, level_scales=LevelScales(0.3, 0.6, 0.9),
        layer_scales=tuple(0.05 * i for i in range(NUM_ATTENTION_LAYERS)), pad_reference=1.25,
        guidance_start=0.05, guidance_end=0.95, no_guidance_start=0.4, no_guidance_end=0.5, injection=True,
        injection_reference_fidelity=0.75, injection_sketch_fidelity=0.5, injection_start=0.1, crop_result=True,
        manipulations=(Manipulation("red hair", "blonde hair", "hair", 3.5, True, (0.4, 0.5, 0.6, 0.9)),
                       Manipulation("blue sky", "none", "sky", 0.0, False, DEFAULT_THRESHOLDS)),
        return_sketch=True, return_heatmap=True)
    return options.replace(**changes)


def positional_from_options(options: ColorizeOptions, images=lambda im: im) -> list:
    """The positional slot values that stand for ``options`` (what the UI would deliver)."""
    values = ui_defaults()
    for spec in FIELDS:
        values[spec.name] = getattr(options, spec.name)
    values["sketch"] = images(options.sketch) if options.sketch is not None else None
    values["reference"] = images(options.reference) if options.reference is not None else None
    for slot, level in zip(LEVEL_SLOTS, ("encoder", "middle", "low")):
        values[slot] = getattr(options.level_scales, level)
    values[ACCURATE_SLOT] = options.layer_scales is not None
    for slot, value in zip(LAYER_SLOTS, options.layer_scales or [1.0] * NUM_ATTENTION_LAYERS):
        values[slot] = value
    values[MANIPULATIONS_SLOT] = format_manipulation_sequence(options.manipulations)
    return [values[slot] for slot in UI_ORDER]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def assert_options_equal(got: ColorizeOptions, want: ColorizeOptions, *, images=True):
    assert got.replace(sketch=None, reference=None) == want.replace(sketch=None, reference=None)
    if images:
        for name in ("sketch", "reference"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.mode == "RGB"
                assert same_pixels(a, Image.alpha_composite(Image.new("RGBA", b.size, "white"),
                                                            b.convert("RGBA"))), name


# ---------------------------------------------------------------------------------------------- the UI
@pytest.mark.parametrize("is_img2img", [False, True])
def test_ui_builds_with_the_documented_components(is_img2img):
    script, components = build(is_img2img)
    assert len(components) == len(UI_ORDER) == 74      # 43 SD2.1, 16 enhance, 5 XL, pasted enabled, 9 form (append only)
    assert UI_ORDER[42] == MANIPULATIONS_SLOT
    assert isinstance(components[0], gr.Checkbox) and components[0].accordion_id.endswith("_enabled")
    by_slot = dict(zip(UI_ORDER, components))
    assert isinstance(by_slot["sketch"], gr.Image) and by_slot["sketch"].type == "pil"
    assert isinstance(by_slot["reference"], gr.Image) and by_slot["reference"].source == "upload"
    assert isinstance(by_slot["sketch_mode"], gr.Radio) and isinstance(by_slot["line_extractor"], gr.Dropdown)
    assert isinstance(by_slot[MANIPULATIONS_SLOT], gr.Textbox)
    assert by_slot[USE_INIT_IMAGE_SLOT].visible is is_img2img
    assert by_slot["line_extractor"].visible is False                 # default mode is invert
    ids = [c.elem_id for c in components]
    assert len(set(ids)) == len(ids)
    tab = "img2img" if is_img2img else "txt2img"
    assert all(i.startswith(f"script_{tab}_colorizediffusion_") for i in ids)


def test_ui_defaults_are_the_field_table_defaults():
    _, components = build()
    values = [c.value for c in components]
    assert dict(zip(UI_ORDER, values)) == ui_defaults()
    assert parse_script_args(values) == ColorizeOptions()


def test_sliders_follow_the_field_table():
    _, components = build()
    by_slot = dict(zip(UI_ORDER, components))
    assert by_slot["enabled"].label == "ColorizeDiffusion"          # the accordion's title
    for spec in FIELDS[1:]:
        component = by_slot[spec.name]
        assert component.label == spec.label
        assert component.value == spec.default
        assert getattr(component, "webui_tooltip", None) == spec.tooltip, spec.name
        if spec.kind is float:
            assert isinstance(component, gr.Slider)
            assert (component.minimum, component.maximum, component.step) == (spec.minimum, spec.maximum,
                                                                              spec.step)
    for i, slot in enumerate(LAYER_SLOTS):
        assert by_slot[slot].label.startswith(f"{i} ")
    assert by_slot[LAYER_SLOTS[0]].label == "0 down0.attn0" and by_slot[LAYER_SLOTS[6]].label == "6 middle"


def test_ui_has_no_side_effects():
    before = dict(cd_ui.PASTE_FUNCTIONS)
    script_a, first = build()
    script_b, second = build()
    assert cd_ui.PASTE_FUNCTIONS == before
    assert [t for _, t in script_a.infotext_fields] == [t for _, t in script_b.infotext_fields]
    assert script_a.paste_field_names == script_b.paste_field_names
    assert first[1] is not second[1]


def test_infotext_fields_cover_every_slot_but_use_init_image_and_the_form():
    script, components = build(True)
    fields = script.infotext_fields
    unpasted = {USE_INIT_IMAGE_SLOT} | {slot for slot in FORM_SLOTS if slot != FORM_TARGET_SLOT}
    assert [c for c, _ in fields] == [c for slot, c in zip(UI_ORDER, components) if slot not in unpasted]
    for _, target in fields:
        assert isinstance(target, str) and target.startswith("CD ") or callable(target)
    assert script.paste_field_names == [t for _, t in fields]
    # both tabs share the paste functions (the "Send to" copy matches them by identity)
    txt, _ = build(False)
    assert [t for _, t in txt.infotext_fields] == [t for _, t in fields]


# ------------------------------------------------------------------------------------------ pasting
def pasted_slots(script, components, params):
    from modules import infotext_utils

    values = infotext_utils.paste_values(script.infotext_fields, params)
    slot_of = {id(c): slot for slot, c in zip(UI_ORDER, components)}
    return {slot_of[id(c)]: v for (c, _), v in zip(script.infotext_fields, values)}


def test_paste_restores_ui_values():
    from modules import infotext_utils

    options = rich_options()
    params = {"Steps": 20, "Sampler": "Euler a", "Seed": 1}
    params.update(options_to_infotext(options))
    text = format_parameters_text("a prompt", params)
    parsed = infotext_utils.parse_generation_parameters(text)
    script, components = build()
    slots = pasted_slots(script, components, parsed)
    assert slots["sketch"] is None and slots["reference"] is None       # images never come from an infotext
    ui_values = [c.value for c in components]
    for slot, value in slots.items():
        if value is not None:
            ui_values[SLOT_INDEX[slot]] = value
    ui_values[SLOT_INDEX["sketch"]] = options.sketch
    got = parse_script_args(ui_values)
    assert_options_equal(got, options.replace(return_sketch=False, return_heatmap=False,
                                              manipulations=options.active_manipulations), images=False)
    assert slots["enabled"] is True and slots[ACCURATE_SLOT] is True
    assert isinstance(slots["reference_guidance"], float) and slots["sketch_mode"] == "extract"


def test_paste_of_a_plain_infotext_switches_off_only():
    from modules import infotext_utils

    script, components = build()
    parsed = infotext_utils.parse_generation_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    slots = pasted_slots(script, components, parsed)
    assert slots.pop("enabled") is False and slots.pop(INFOTEXT_ENABLED_SLOT) is False
    assert all(v is None for v in slots.values())


def test_paste_fills_defaults_for_keys_left_out():
    from modules import infotext_utils

    script, components = build()
    text = format_parameters_text("", {"Steps": 20, **options_to_infotext(
        ColorizeOptions(enabled=True, sketch=sketch_image()))})
    slots = pasted_slots(script, components, infotext_utils.parse_generation_parameters(text))
    assert slots["injection"] is False and slots["injection_start"] == 0.0
    assert slots["line_extractor"] == FIELD_BY_NAME["line_extractor"].default
    assert slots[ACCURATE_SLOT] is False and slots[LAYER_SLOTS[3]] == 1.0
    assert slots[MANIPULATIONS_SLOT] == ""


def test_api_infotext_gives_typed_script_args():
    from modules import infotext_utils

    options = rich_options(injection=False, crop_result=False)
    text = format_parameters_text("", {"Steps": 20, "Seed": 2, **options_to_infotext(options)})
    script, components = build()
    values = infotext_utils.apply_api_infotext(script.infotext_fields,
                                               infotext_utils.parse_generation_parameters(text))
    by_component = {id(c): v for (c, _), v in zip(script.infotext_fields, values)}
    slots = {slot: by_component.get(id(c)) for slot, c in zip(UI_ORDER, components)}
    assert slots["injection"] is False and slots["crop_result"] is False   # not bool("False")
    assert slots["enabled"] is True and slots["reference_guidance"] == 7.5


# ----------------------------------------------------------------------------------------- parsing
def test_parse_ui_values_with_pil_images():
    options = rich_options()
    got = parse_script_args(positional_from_options(options))
    assert_options_equal(got, options)
    assert got.sketch.getpixel((0, 0)) == (255, 255, 255)             # transparent paper became white


def test_parse_gradio_sketch_tool_dict():
    options = rich_options()
    values = positional_from_options(options)
    values[SLOT_INDEX["sketch"]] = {"image": options.sketch, "mask": None}
    assert_options_equal(parse_script_args(values), options)


def test_parse_positional_api_list_with_base64():
    options = rich_options()
    values = positional_from_options(options, images=lambda im: png_b64(im, data_url=True))
    assert_options_equal(parse_script_args(values), options)


def test_parse_positional_api_manipulations_as_json_list():
    options = rich_options()
    values = positional_from_options(options, images=png_b64)
    values[SLOT_INDEX[MANIPULATIONS_SLOT]] = options.to_dict()["manipulations"]
    assert_options_equal(parse_script_args(values), options)


def test_short_positional_list_takes_defaults():
    got = parse_script_args([True, png_b64(sketch_image())])
    assert got.replace(sketch=None) == ColorizeOptions(enabled=True)


def test_parse_api_dict():
    options = rich_options()
    data = options.to_dict()
    data["sketch"], data["reference"] = png_b64(options.sketch), png_b64(options.reference)
    # the webui fills the remaining positions with UI defaults; they are ignored
    args = [data] + [c for c in list(ui_defaults().values())[1:]]
    assert_options_equal(parse_script_args(args), options)
    assert_options_equal(parse_script_args((data,)), options)


@pytest.mark.parametrize("data,field", [
    ({"enabled": True, "reference_cfg": 4.0}, "reference_cfg"),
    ({"reference_guidance": 99}, "reference_guidance"),
    ({"sketch_guidance": float("nan")}, "sketch_guidance"),
    ({"sketch_strength": "strong"}, "sketch_strength"),
    ({"injection": "yes"}, "injection"),
    ({"sketch_mode": 3}, "sketch_mode"),
    ({"level_scales": {"middle": 2}}, "level_scales.middle"),
    ({"layer_scales": [1] * 15}, "layer_scales"),
    ({"manipulations": [{"target": "x", "thresholds": [0.9, 0.5, 0.6, 0.7]}]}, "manipulations[0].thresholds"),
    ({"enabled": True, "sketch": "not base64!"}, "sketch"),
    ({"enabled": True}, "sketch"),
    ({"use_init_image": "sure"}, "use_init_image"),
])
def test_api_dict_errors_name_the_field(data, field):
    with pytest.raises(InvalidInput) as error:
        parse_script_args([data])
    assert error.value.field == field
    assert field in str(error.value)


def test_unknown_keys_are_listed():
    with pytest.raises(InvalidInput) as error:
        parse_script_args([{"reference_cfg": 1, "sketch_cfg": 2}])
    assert "reference_cfg" in str(error.value) and "sketch_cfg" in str(error.value)


@pytest.mark.parametrize("slot,value,field", [
    ("reference_guidance", 0.5, "reference_guidance"),
    ("reference_guidance", math.inf, "reference_guidance"),
    ("pad_reference", "wide", "pad_reference"),
    ("enabled", "on", "enabled"),
    (LEVEL_SLOTS[1], 1.5, "level_scales.middle"),
    (LAYER_SLOTS[3], -0.1, "layer_scales[3]"),
    (MANIPULATIONS_SLOT, "[target] a; [anchor] b", "manipulations"),
    ("sketch", 12, "sketch"),
])
def test_positional_errors_name_the_field(slot, value, field):
    values = positional_from_options(rich_options())
    values[SLOT_INDEX[slot]] = value
    with pytest.raises(InvalidInput) as error:
        parse_script_args(values)
    assert error.value.field == field


def test_too_many_positional_values():
    with pytest.raises(InvalidInput) as error:
        parse_script_args(list(ui_defaults().values()) + [1])
    assert error.value.field == "args"


def test_layer_sliders_are_ignored_unless_accurate():
    values = positional_from_options(rich_options(layer_scales=None))
    values[SLOT_INDEX[LAYER_SLOTS[0]]] = 0.25
    assert parse_script_args(values).layer_scales is None


# ------------------------------------------------------------------------------------ overrides on p
def test_xyz_overrides_win_over_args():
    p = types.SimpleNamespace()
    setattr(p, override_attr("reference_guidance"), 9.0)
    setattr(p, override_attr("injection"), False)
    setattr(p, level_override_attr("middle"), 0.1)
    for args in (positional_from_options(rich_options()), [rich_options().to_dict(include_images=True)]):
        got = parse_script_args(args, p)
        assert got.reference_guidance == 9.0 and got.injection is False
        assert got.level_scales == LevelScales(0.3, 0.1, 0.9)
        assert got.sketch_guidance == 1.5


def test_override_level_scales_without_args():
    p = types.SimpleNamespace(cd_level_scales_low=0.5, cd_manipulations="[target] red; [anchor] none; "
                              "[control] hair; [scale] 1.0; [enhanced] False; [ts0] 0.5; [ts1] 0.55; "
                              "[ts2] 0.65; [ts3] 0.95")
    got = parse_script_args([], p)
    assert got.level_scales == LevelScales(1.0, 1.0, 0.5)
    assert got.manipulations[0].target == "red"


def test_invalid_override_is_rejected_by_name():
    p = types.SimpleNamespace(cd_sketch_strength=7.0)
    with pytest.raises(InvalidInput) as error:
        parse_script_args([], p)
    assert error.value.field == "sketch_strength"
    p = types.SimpleNamespace(cd_level_scales_encoder=-1)
    with pytest.raises(InvalidInput) as error:
        parse_script_args([], p)
    assert error.value.field == "level_scales.encoder"


# ------------------------------------------------------------------------------------------- img2img
def test_img2img_init_image_as_sketch():
    init = Image.new("RGB", (48, 32), (250, 250, 250))
    values = positional_from_options(rich_options(sketch=None))
    values[SLOT_INDEX[USE_INIT_IMAGE_SLOT]] = True
    got = parse_script_args(values, types.SimpleNamespace(init_images=[init]), is_img2img=True)
    assert got.sketch.size == (48, 32)
    # without p the caller fills the sketch later
    assert parse_script_args(values, None, is_img2img=True).sketch is None
    with pytest.raises(InvalidInput) as error:
        parse_script_args(values, types.SimpleNamespace(init_images=[]), is_img2img=True)
    assert error.value.field == "sketch"
    # txt2img ignores the (hidden) checkbox
    with pytest.raises(InvalidInput):
        parse_script_args(values, types.SimpleNamespace(init_images=[init]), is_img2img=False)


def test_img2img_dict_form_use_init_image():
    init = Image.new("RGB", (20, 20), "white")
    got = parse_script_args([{"enabled": True, "use_init_image": True}],
                            types.SimpleNamespace(init_images=[init]), is_img2img=True)
    assert got.sketch.size == (20, 20)


# --------------------------------------------------------------------------------- manipulation buttons
def form(target="red hair", anchor="", control="hair", scale=2.5, enhance=False, ts=DEFAULT_THRESHOLDS):
    return (target, anchor, control, scale, enhance, *ts)


def test_add_and_clear_buttons():
    sequence, t, a, c = cd_ui.add_manipulation("", *form())
    assert (t, a, c) == ("", "", "")
    sequence, *_ = cd_ui.add_manipulation(sequence + "\n\n", *form(target="blue", control="sky", enhance=True))
    lines = sequence.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[target] red hair; [anchor] none; [control] hair; [scale] 2.5")
    got = parse_script_args([{"manipulations": []}])
    assert got.manipulations == ()
    values = positional_from_options(ColorizeOptions())
    values[SLOT_INDEX[MANIPULATIONS_SLOT]] = sequence
    groups = parse_script_args(values).manipulations
    assert [g.target for g in groups] == ["red hair", "blue"] and groups[1].enhance is True


@pytest.mark.parametrize("bad", [
    dict(ts=(0.5, 0.4, 0.65, 0.95)),
    dict(scale=20),
    dict(target="a\nb"),
])
def test_add_rejects_bad_groups(bad):
    with pytest.raises(gr.Error):
        cd_ui.add_manipulation("", *form(**bad))


def test_add_rejects_a_full_sequence():
    sequence = format_manipulation_sequence([Manipulation("a", "none", "b", 1.0)] * 16)
    with pytest.raises(gr.Error):
        cd_ui.add_manipulation(sequence, *form())


@pytest.fixture
def fake_api(monkeypatch):
    calls = []
    module = types.ModuleType("cd_webui.api")

    def visualize_heatmap(reference, sequence_text, control, thresholds):
        calls.append((reference, sequence_text, control, thresholds))
        if control == "broken":
            raise InvalidInput("manipulations", "line 1: nonsense")
        return Image.new("RGB", reference.size, "red")

    module.visualize_heatmap = visualize_heatmap
    monkeypatch.setitem(sys.modules, "cd_webui.api", module)
    monkeypatch.setattr(cd_webui, "api", module, raising=False)
    return calls


def test_visualize_button(fake_api):
    reference = reference_image()
    image = cd_ui.visualize(reference, "seq", "hair", *DEFAULT_THRESHOLDS)
    assert image.size == reference.size
    assert fake_api == [(reference, "seq", "hair", DEFAULT_THRESHOLDS)]
    with pytest.raises(gr.Error) as error:
        cd_ui.visualize(reference, "", "broken", *DEFAULT_THRESHOLDS)
    assert "nonsense" in str(error.value)
    with pytest.raises(gr.Error):
        cd_ui.visualize(reference, "", "hair", 0.5, 0.5, 0.6, 0.7)
    with pytest.warns(UserWarning, match="reference"):       # gr.Warning outside a request is a warning
        assert cd_ui.visualize(None, "", "hair", *DEFAULT_THRESHOLDS) is None
    assert len(fake_api) == 2


def test_gradio_errors_are_colorize_messages():
    assert issubclass(InvalidInput, ColorizeError)


# --------------------------------------------------------------------------------------- javascript
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_use_sketch_size_arithmetic():
    script = (f"globalThis.window = globalThis; require({str(REPO / 'javascript' / 'colorize_diffusion.js')!r});"
              "const f = window.colorizeDiffusionSizeFor;"
              "console.log(JSON.stringify([f(1000, 500), f(512, 512), f(600, 900), f(0, 4),"
              "                            f(1000, 500, 768), f(512, 512, 768), f(600, 900, 512)]));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60, check=True).stdout
    # without a native size: 512 (v1); the server sends 768 for v2
    assert out.strip() == "[[704,384],[512,512],[448,640],null,[1088,512],[768,768],[448,640]]"


# ------------------------------------------------------------------------------- the real webui helpers
@pytest.mark.parametrize("is_img2img", [False, True])
def test_ui_builds_with_the_real_input_accordion(monkeypatch, is_img2img):
    """The real modules/ui_components.py only needs gradio: load it under another name and build with it."""
    import importlib.util

    # the module patches gr.Dropdown on import, as in the webui; undo that after the test
    monkeypatch.setattr(gr.Dropdown, "get_expected_parent", gr.Dropdown.get_expected_parent)
    spec = importlib.util.spec_from_file_location("webui_real_ui_components",
                                                  real_webui_path("modules/ui_components.py"))
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    monkeypatch.setattr(cd_ui, "InputAccordion", real.InputAccordion)
    script, components = build(is_img2img)
    assert isinstance(components[0], real.InputAccordion) and components[0].value is False
    assert len(components) == len(UI_ORDER)
    assert parse_script_args([c.value for c in components], is_img2img=is_img2img) == ColorizeOptions()


def test_api_infotext_paste_survives_a_named_dict():
    """The API's "infotext" field pastes into the positional slots, then a named dict replaces slot 0: the keys
    the dict does not name come from the pasted slots (found in the real webui), the dict's own keys win."""
    pasted = rich_options(sketch_mode="invert", reference_guidance=3.5, sketch_guidance=1.5, injection=True)
    slots = positional_from_options(pasted, images=lambda im: None)
    named = {"enabled": True, "sketch": png_b64(sketch_image()), "reference": png_b64(reference_image()),
             "sketch_guidance": 2.0}
    options = parse_script_args([named] + slots[1:])
    assert options.reference_guidance == 3.5 and options.injection is True
    assert options.layer_scales == pasted.layer_scales and options.manipulations == pasted.manipulations
    assert options.sketch_guidance == 2.0, "the named dict's own keys win"
    # nothing pasted: the remaining slots hold the UI defaults and the dict alone decides
    plain = parse_script_args([named] + list(ui_defaults().values())[1:])
    assert plain.reference_guidance == 5.0 and plain.layer_scales is None and plain.manipulations == ()


def test_over_long_manipulation_prompt_is_refused_by_the_tokenizer_alone():
    data = {"enabled": True, "sketch": png_b64(sketch_image()), "reference": png_b64(reference_image()),
            "manipulations": [{"target": " ".join(f"word{i}" for i in range(80)), "control": "hair", "scale": 2}]}
    with pytest.raises(InvalidInput) as info:
        parse_script_args([data])
    assert info.value.field == "manipulations[0].target" and "at most 75" in str(info.value)


# ------------------------------------------------------------------- the API's infotext with a named dict
def test_api_infotext_restores_enabled_when_the_named_dict_omits_it():
    """The real webui API (Api.apply_infotext, Api.init_script_args): the infotext fills every slot, then the
    named dict replaces slot 0; the README promises that omitted keys, ``enabled`` too, take the pasted values."""
    import types as _types

    from modules import infotext_utils

    script, components = build()
    script.args_from, script.args_to, script.alwayson = 1, 1 + len(components), True
    infotext_utils_ns = _types.SimpleNamespace(
        paste_fields={"txt2img": {"fields": [infotext_utils.PasteField(*f) for f in script.infotext_fields]}},
        parse_generation_parameters=infotext_utils.parse_generation_parameters,
        get_override_settings=lambda params: [])

    class HTTPException(Exception):
        def __init__(self, status_code, detail):
            super().__init__(detail)

    api = real_webui_functions("modules/api/api.py", ["Api.apply_infotext", "Api.init_script_args"],
                               {"infotext_utils": infotext_utils_ns, "HTTPException": HTTPException})
    pasted = rich_options(reference_guidance=3.5, injection=False)
    text = format_parameters_text("", {"Steps": 20, "Sampler": "Euler", **options_to_infotext(pasted)})
    named = {"sketch": png_b64(sketch_image()), "reference": png_b64(reference_image())}

    class Request:
        infotext = text
        override_settings = None
        __fields__: dict = {}
        alwayson_scripts = {"ColorizeDiffusion": {"args": [named]}}

        def dict(self, exclude_unset=False):
            return {"infotext": self.infotext, "alwayson_scripts": self.alwayson_scripts}

    owner = _types.SimpleNamespace(get_script=lambda name, runner: script)
    runner = _types.SimpleNamespace(inputs=[None] + list(components), scripts=[script])
    mentioned: dict = {}
    request = Request()
    api["Api.apply_infotext"](owner, request, "txt2img", script_runner=runner, mentioned_script_args=mentioned)
    defaults = [0] + [c.value for c in components]
    script_args = api["Api.init_script_args"](owner, request, defaults, None, None, runner,
                                              input_script_args=mentioned)
    assert script_args[1] is named
    options = parse_script_args(script_args[1:])
    assert options.enabled is True
    assert options.reference_guidance == 3.5 and options.layer_scales == pasted.layer_scales
    # without an infotext the dict alone decides: disabled
    assert parse_script_args([named] + defaults[2:]).enabled is False


# ------------------------------------------------------------------------------- the manipulation form
def form_slots(target="red hair", anchor="", control="hair", scale=2.5, enhance=True, ts=(0.4, 0.5, 0.6, 0.9)):
    return dict(zip(FORM_SLOTS, (target, anchor, control, scale, enhance, *ts)))


def test_the_form_applies_after_the_sequence_when_its_target_is_filled():
    sequence = format_manipulation_sequence([Manipulation("blue sky", "none", "sky", 1.0)])
    values = dict(zip(UI_ORDER, positional_from_options(ColorizeOptions(enabled=True, sketch=sketch_image()))))
    values[MANIPULATIONS_SLOT] = sequence
    values.update(form_slots())
    groups = parse_script_args([values[s] for s in UI_ORDER]).manipulations
    assert [g.target for g in groups] == ["blue sky", "red hair"]
    assert groups[1] == Manipulation("red hair", "none", "hair", 2.5, True, (0.4, 0.5, 0.6, 0.9))
    values.update(form_slots(target="  "))                       # an empty target: the form is not a group
    assert [g.target for g in parse_script_args([values[s] for s in UI_ORDER]).manipulations] == ["blue sky"]
    values.update(form_slots(scale=99))                          # a filled form is validated like any group
    with pytest.raises(InvalidInput) as error:
        parse_script_args([values[s] for s in UI_ORDER])
    assert error.value.field == "manipulations[1].scale"


def test_add_on_an_empty_form_is_refused():
    for target in ("", "   ", None):
        with pytest.raises(gr.Error, match="target prompt is empty"):
            cd_ui.add_manipulation("", *form(target=target))


def test_pasting_an_infotext_empties_the_forms_target():
    from modules import infotext_utils

    script, components = build()
    text = format_parameters_text("", {"Steps": 20, **options_to_infotext(rich_options())})
    slots = pasted_slots(script, components, infotext_utils.parse_generation_parameters(text))
    assert slots[FORM_TARGET_SLOT] == "" and slots[INFOTEXT_ENABLED_SLOT] is True
    assert all(slot not in slots for slot in FORM_SLOTS[1:])


# -------------------------------------------------------------------------- init image as the sketch
def _event_fn(blocks, trigger_component, event):
    for dependency, function in zip(blocks.dependencies, blocks.fns):
        if trigger_component._id in dependency["targets"] and dependency["trigger"] == event:
            return function.fn
    raise AssertionError(f"no {event} event on the component")


def test_use_init_image_shows_that_the_init_image_is_the_sketch():
    script = FakeScript(True)
    with gr.Blocks() as blocks:
        components = cd_ui.build_ui(script, True)
    by_slot = dict(zip(UI_ORDER, components))
    note = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", "") == script.elem_id("init_sketch_note"))
    assert note.visible is False and cd_ui.INIT_SKETCH_NOTE in note.value
    switch = _event_fn(blocks, by_slot[USE_INIT_IMAGE_SLOT], "change")
    sketch_update, note_update = switch(True)
    assert sketch_update["visible"] is False and note_update["visible"] is True
    sketch_update, note_update = switch(False)
    assert sketch_update["visible"] is True and note_update["visible"] is False


# -------------------------------------------------------------------------------- "Use sketch size"
def test_use_sketch_size_takes_the_loaded_models_native_size(webui, checkpoint_file, tmp_path):
    from lib_colorize.testing.checkpoints import make_checkpoint

    script = FakeScript(False)
    with gr.Blocks() as blocks:
        cd_ui.build_ui(script, False)
    button = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", "") == script.elem_id("use_sketch_size"))
    native_size = _event_fn(blocks, button, "click")
    webui.load(checkpoint_file)
    assert native_size() == 512
    webui.load(make_checkpoint(str(tmp_path / "v2-full.safetensors"), "v2", "tiny", context_dim=32, seed=2))
    assert native_size() == 768


# ---------------------------------------------------------------------------------------- tooltips
def test_level_tooltips_name_the_layers_each_level_scale_changes():
    from cd_webui.args import LAYER_NAMES, LEVEL_LABELS
    from lib_colorize.guidance import cross_attention_scales

    base = cross_attention_scales(1.0, LevelScales())
    for level in ("encoder", "middle", "low"):
        changed = [i for i, (a, b) in enumerate(zip(base, cross_attention_scales(1.0, LevelScales(**{level: 0.5}))))
                   if a != b]
        _, tooltip = LEVEL_LABELS[level]
        named = tooltip.split("the layers ", 1)[1].split(" (", 1)[0].split(", ")
        assert named == [LAYER_NAMES[i] for i in changed], level
    untouched = [i for i, (a, b) in enumerate(zip(base, cross_attention_scales(0.5, LevelScales()))) if a == b]
    assert untouched == [6, 13, 14, 15]
    assert "6 (middle block) and 13-15 (up0)" in FIELD_BY_NAME["reference_strength"].tooltip


def test_window_tooltips_say_what_progress_is():
    for name in ("guidance_start", "guidance_end", "no_guidance_start", "no_guidance_end", "injection_start"):
        assert "1 - t/999" in FIELD_BY_NAME[name].tooltip and "not the fraction of steps" in FIELD_BY_NAME[name].tooltip


# ------------------------------------------------------------------------------------ model adaptation
def test_a_hidden_part_puts_its_controls_back_to_their_defaults(monkeypatch):
    """A value set for one model must not be refused on another where its control is hidden (a sequence typed
    for v1, then an XL checkpoint chosen): the adaptation resets what it hides and leaves the rest alone."""
    from cd_webui.args import ui_defaults

    script = FakeScript(False)
    with gr.Blocks() as blocks:
        components = cd_ui.build_ui(script, False)
    slot_of = {component._id: slot for slot, component in zip(UI_ORDER, components)}
    count = len(cd_ui.visibility_for(None))
    index = next(i for i, d in enumerate(blocks.dependencies)
                 if components[0]._id in d["targets"] and d["trigger"] == "change" and len(d["outputs"]) == count)
    adapt, outputs = blocks.fns[index].fn, blocks.dependencies[index]["outputs"]

    def values_for(version):
        monkeypatch.setattr(cd_ui, "selected_version", lambda: version)
        return {slot_of[i]: update["value"] for i, update in zip(outputs, adapt(True))
                if i in slot_of and "value" in update}

    defaults = ui_defaults()
    xl_hidden = ["manipulations", "form.target", "accurate_layer_scales", "return_heatmap", "level_scales.middle",
                 "level_scales.low"]
    assert values_for("sdxl") == {slot: defaults[slot] for slot in xl_hidden}
    assert values_for("xlv2") == {slot: defaults[slot] for slot in xl_hidden if slot != "level_scales.low"}
    sd21_hidden = ["sketch_strength_1", "sketch_strength_2", "sketch_strength_3", "sketch_strength_4", "sketch_rope"]
    assert values_for("v1") == {slot: defaults[slot] for slot in sd21_hidden}
    assert values_for(None) == {}
