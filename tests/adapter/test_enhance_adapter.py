"""The enhance modes in the stand-in webui: every version through the API's named keys (base64 images), infotext,
hires fix, batch, gallery masks, remove background, errors naming the key and the version, and the accordion's
enhance section showing only what the loaded checkpoint can do."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from conftest import CONTEXT_DIM, reference_image, sketch_image
from lib_colorize.errors import InvalidInput
from lib_colorize.processors import live_count

from cd_webui import enhance_ui, lifecycle
from cd_webui.args import ENHANCE_SLOTS, UI_ORDER


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def half_mask(size=(80, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


@pytest.fixture(scope="session")
def enhance_files(tmp_path_factory, data_dir):
    from lib_colorize.testing.checkpoints import make_checkpoint
    from lib_colorize.testing.masks import make_mask_extractor_files

    make_mask_extractor_files(data_dir / "models" / "ColorizeDiffusion", divisor=16)
    folder = tmp_path_factory.mktemp("enhance-ckpts")
    return {version: make_checkpoint(str(folder / f"{name}-tiny.safetensors"), version=version, size="tiny",
                                     context_dim=CONTEXT_DIM, seed=5)
            for version, name in (("v1", "mult-eps"), ("v1.5", "switch-eps"), ("v2", "v2-full"))}


def named(**extra):
    options = {"enabled": True, "sketch": b64(sketch_image()), "reference": b64(reference_image()),
               "reference_guidance": 3.0, "sketch_guidance": 1.5, "sketch_mask": b64(half_mask()),
               "reference_mask": b64(half_mask((48, 64)))}
    options.update(extra)
    return options


MODES = [("v1", dict(bg_enhance=True), "CD BG enhance"),
         ("v1.5", dict(bg_enhance=True, fg_enhance=True), "CD FG enhance"),
         ("v2", dict(style_enhance=True, bg_enhance=True, background=True, remove_foreground=True),
          "CD style enhance")]


@pytest.mark.parametrize("version,mode,key", MODES, ids=[m[0] for m in MODES])
def test_modes_run_through_named_keys_with_infotext_and_differ_from_default(webui, enhance_files, version, mode,
                                                                           key):
    webui.load(enhance_files[version])
    mode = dict(mode)
    if mode.pop("background", False):
        mode["background"] = b64(reference_image((64, 48)))
    default = webui.txt2img(named())
    webui.run(default)
    p = webui.txt2img(named(return_masks=True, **mode), batch_size=2)
    processed = webui.run(p)
    assert p.extra_generation_params[key] is True
    assert p.extra_generation_params["CD sketch mask hash"]
    samples = torch.cat(p.all_samples)
    assert not torch.allclose(samples[:1], default.all_samples[0], atol=1e-3)
    # the sketch mask, and the reference mask (v1, v1.5) or the background's (v2 with remove foreground)
    assert len(processed.images) == 2 + 2, "the masks used are in the gallery"
    assert live_count() == 0 and lifecycle.get_state(p).processors is None
    # image 1 of the batch is the generation of its seed alone
    alone = webui.txt2img(named(**mode), seed=1235)
    webui.run(alone)
    assert torch.equal(samples[1:2], alone.all_samples[0])


def test_hires_fix_prepares_the_modes_at_each_pass_size(webui, enhance_files):
    webui.load(enhance_files["v2"])
    p = webui.txt2img(named(bg_enhance=True, style_enhance=True, remove_background=True, crop_result=True),
                      enable_hr=True, hr_scale=2.0, denoising_strength=0.6)
    processed = webui.run(p)
    state = lifecycle.get_state(p)
    assert state.passes == 2 and live_count() == 0
    assert processed.images[0].size == (128, 102)     # remove background, then crop, at the hires size


@pytest.mark.parametrize("version,options,match", [
    ("v1", {"style_enhance": True}, r"style_enhance: needs a v2 \(v2-full\) checkpoint; the loaded checkpoint is v1"),
    ("v1", {"fg_enhance": True}, r"fg_enhance: needs a v1\.5 \(switch-eps\) or v2"),
    ("v1.5", {"background_factor": 0.5}, r"background_factor: needs a v2"),
    ("v2", {"remove_foreground": True, "bg_enhance": True}, r"remove_foreground.*background image"),
])
def test_a_key_the_model_cannot_honour_is_an_error(webui, enhance_files, version, options, match):
    webui.load(enhance_files[version])
    with pytest.raises(InvalidInput, match=match):
        webui.run(webui.txt2img(named(**options)))
    assert live_count() == 0


def test_enhance_section_shows_what_the_loaded_checkpoint_can_do(webui, enhance_files):
    import gradio as gr

    from cd_webui import ui as cd_ui

    webui.load(enhance_files["v1"])
    script = webui.module.ColorizeDiffusionScript()
    script.filename = "colorize_diffusion.py"
    with gr.Blocks():
        components = cd_ui.build_ui(script, False)
    by_slot = dict(zip(UI_ORDER, components))
    first = UI_ORDER.index(ENHANCE_SLOTS[0])
    assert [by_slot[s] for s in ENHANCE_SLOTS] == components[first:first + len(ENHANCE_SLOTS)]
    assert by_slot["bg_enhance"].visible and not by_slot["style_enhance"].visible
    assert not by_slot["fg_enhance"].visible and not by_slot["background_factor"].visible
    notice = enhance_ui.notice_for("v1")
    assert "v1 (mult-*)" in notice and "Style enhance (needs v2 (v2-full))" in notice
    webui.load(enhance_files["v2"])
    updates = enhance_ui._refresh(None)
    assert "Every enhance mode is available" in updates[0]["value"]
    assert all(u["visible"] for u in updates[1:])
    hidden = enhance_ui.visibility_updates("v1.5")
    assert [u["visible"] for u in hidden[1:]] == [False, True, False]     # style, fg, factor
    assert hidden[1]["value"] is False and hidden[3]["value"] == 1.0, "a hidden control is reset"
    # the webui's checkpoint dropdown (built later, in the page's own Blocks) drives this page's sections
    from modules import script_callbacks

    enhance_ui.on_before_ui()
    with gr.Blocks() as tab:
        cd_ui.build_ui(script, False)
    with gr.Blocks() as page:
        dropdown = gr.Dropdown(["a"], elem_id=enhance_ui.CHECKPOINT_ELEM_ID)
        script_callbacks.after_component_callback(dropdown, elem_id=enhance_ui.CHECKPOINT_ELEM_ID)
        tab.render()
    assert enhance_ui._dropdowns == [dropdown] and len(enhance_ui._sections) == 1
    wired = [d for d in page.dependencies if dropdown._id in d["targets"]]
    assert len(wired) == 1 and len(wired[0]["outputs"]) == 4
    script_callbacks.callback_map["callbacks_before_ui"][0].callback()   # a "Reload UI" forgets the old page
    assert enhance_ui._sections == [] and enhance_ui._dropdowns == []


def test_infotext_pastes_the_modes(webui):
    from cd_webui import ui as cd_ui
    from lib_colorize.infotext import parse_parameters_text

    params = parse_parameters_text("x\nSteps: 20, Sampler: Euler, CD enabled: True, CD BG enhance: True, "
                                   "CD sketch mask threshold: 0.1, CD merging scale: 0.25")
    assert cd_ui.PASTE_FUNCTIONS["bg_enhance"](params) is True
    assert cd_ui.PASTE_FUNCTIONS["sketch_mask_threshold"](params) == 0.1
    assert cd_ui.PASTE_FUNCTIONS["style_enhance"](params) is False
    assert cd_ui.PASTE_FUNCTIONS["background"](params) is None
