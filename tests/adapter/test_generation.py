"""Generation rules in the stand-in webui: the webui's inference dtype for conditioning, ``enabled`` validation,
"Crop result" under hires fix, the infotext's CFG scale, the note on a disabled ColorizeDiffusion checkpoint, the
gallery heat maps, and the global random state."""
from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import real_webui_functions, reference_image, sketch_image
from lib_colorize.errors import InvalidInput
from lib_colorize.preprocess import prepare_sketch

import cd_webui.model as cd_model
from cd_webui import lifecycle


def enabled(**extra):
    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image(),
               "reference_guidance": 3.0, "sketch_guidance": 1.5}
    options.update(extra)
    return options


def first_pass(p, x_shape=(1, 4, 8, 8)):
    """Run the hooks up to the first sampling pass's preparation; returns the generation state."""
    from modules import sd_samplers

    p.scripts.before_process(p)
    p.all_seeds = p.seeds = [p.seed]
    p.scripts.process(p)
    p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
    p.sampler.initialize(p)
    p.scripts.process_before_every_sampling(p, x=torch.zeros(x_shape), noise=torch.zeros(x_shape), c=None, uc=None)
    return lifecycle.get_state(p)


# ---------------------------------------------------------------------------------- inference dtype
def test_conditioning_takes_the_webuis_inference_dtype_not_the_fp8_weights(webui, sd_model):
    """The "FP8 weight" setting stores the U-Net's Linear/Conv weights as float8; the webui still computes in
    devices.dtype_unet, and so must the reference tokens, sketch hints and injection latents."""
    from modules import devices

    for module in sd_model.model.diffusion_model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.to(torch.float8_e4m3fn)
    assert next(sd_model.model.diffusion_model.parameters()).dtype == torch.float8_e4m3fn
    state = first_pass(webui.txt2img(enabled(injection=True)))
    try:
        assert state.error is None
        plan = state.context.plan
        assert state.tokens.dtype == devices.dtype_unet == torch.float32
        assert {h.dtype for h in plan.sketch_hints + plan.blank_hints} == {devices.dtype_unet}
        assert plan.injection.reference_latents.dtype == devices.dtype_unet
    finally:
        state.release()


# ---------------------------------------------------------------------------------------- enabled
@pytest.mark.parametrize("value", ["yes", "on", "1", 1, 0, "enabled", 1.0])
def test_a_non_boolean_enabled_is_refused_with_the_field_named(webui, sd_model, value):
    p = webui.txt2img({"enabled": value, "sketch": sketch_image(), "reference": reference_image()})
    with pytest.raises(InvalidInput) as error:
        webui.run(p)
    assert error.value.field == "enabled" and "true or false" in str(error.value)


def test_a_bare_string_as_the_first_positional_arg_is_refused(webui, sd_model):
    p = webui.txt2img(None)
    p.script_args = [0, "colorize"] + [None] * (webui.num_args - 1)
    with pytest.raises(InvalidInput) as error:
        webui.run(p)
    assert error.value.field == "enabled"


@pytest.mark.parametrize("value", [False, "false", "False", None])
def test_an_explicit_off_still_disables_quietly(webui, sd_model, value):
    p = webui.txt2img({"enabled": value, "reference_guidance": 99})   # other bad args are ignored when off
    processed = webui.run(p)
    assert len(processed.images) == 1 and lifecycle.get_state(p) is None


# --------------------------------------------------------------------------------- crop under hires
def wide_sketch() -> Image.Image:
    image = Image.new("RGB", (80, 40), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((4, 4, 75, 35), outline=(0, 0, 0), width=3)
    return image


def test_the_webui_cuts_an_aspect_changing_hires_pass_as_the_stand_in_is_told(monkeypatch):
    """Hires "Resize to 128x96" from 64x64: the webui upscales to 128x128 (aspect kept) and cuts 4 latent rows."""
    namespace = {"opts": types.SimpleNamespace(use_old_hires_fix_width_height=False), "opt_f": 8}
    calculate = real_webui_functions("modules/processing.py",
                                     ["StableDiffusionProcessingTxt2Img.calculate_target_resolution"], namespace)
    p = types.SimpleNamespace(width=64, height=64, hr_scale=2.0, hr_resize_x=128, hr_resize_y=96, truncate_x=0,
                              truncate_y=0, extra_generation_params={}, applied_old_hires_behavior_to=None)
    calculate["StableDiffusionProcessingTxt2Img.calculate_target_resolution"](p)
    assert (p.hr_upscale_to_x, p.hr_upscale_to_y, p.truncate_x, p.truncate_y) == (128, 128, 0, 4)


def test_crop_result_under_an_aspect_changing_hires_pass(webui, sd_model, monkeypatch):
    """The hires pass keeps the first pass's drawing where it is, so its sketch and the crop box go with it."""
    from lib_colorize import conditioning

    seen = []
    original = conditioning.encode_sketch_hints
    def recording(encoder, sketch, *args, **kwargs):
        seen.append(sketch.clone())
        return original(encoder, sketch, *args, **kwargs)

    monkeypatch.setattr(conditioning, "encode_sketch_hints", recording)

    def run(crop):
        p = webui.txt2img(enabled(sketch=wide_sketch(), crop_result=crop), width=64, height=64, enable_hr=True,
                          denoising_strength=0.6)
        p.hr_upscale_to_x, p.hr_upscale_to_y, p.truncate_x, p.truncate_y = 128, 128, 0, 4   # as the webui does
        return webui.run(p).images[0]

    full, cropped = run(False), run(True)
    assert full.size == (128, 96)
    # the first pass fits the 2:1 sketch into 64x64 at rows 16..48; upscaled x2 that is rows 32..96 of 128,
    # and the cut of 2 latent rows (16 px) at the top puts it at rows 16..80
    assert cropped.size == (128, 64)
    assert cropped.tobytes() == full.crop((0, 16, 128, 80)).tobytes()
    on_canvas, _ = prepare_sketch(wide_sketch(), "invert", (128, 128))
    assert torch.equal(seen[1], on_canvas[..., 16:112, :]), "the hires pass's sketch lies on the first pass's"


# --------------------------------------------------------------------------------------- infotext
class _Defaults(types.SimpleNamespace):
    """What create_infotext reads from opts/shared/p that the test does not care about: 0."""

    def __getattr__(self, name):
        return 0


def _webui_infotext(p) -> str:
    from modules import infotext_utils

    namespace = {"opts": _Defaults(CLIP_stop_at_last_layers=1, randn_source="GPU"), "shared": _Defaults(),
                 "devices": _Defaults(fp8=False), "sd_samplers_common": _Defaults(),
                 "infotext_utils": infotext_utils, "errors": _Defaults(), "program_version": lambda: "v1.10.1"}
    create = real_webui_functions("modules/processing.py", ["create_infotext"], namespace)["create_infotext"]
    view = _Defaults(**{k: v for k, v in vars(p).items()})
    view.get_token_merging_ratio = lambda for_hr=False: 0
    view.all_negative_prompts, view.scheduler = [""], "Automatic"
    return create(view, [""], p.all_seeds, p.all_seeds)


def test_infotext_has_no_cfg_scale_while_colorizing(webui, sd_model):
    p = webui.txt2img(enabled(), cfg_scale=7.0)
    webui.run(p)
    text = _webui_infotext(p)
    assert "CD enabled: True" in text and "CD reference guidance: 3" in text
    assert "CFG scale" not in text
    plain = webui.txt2img(None, cfg_scale=7.0)
    webui.run(plain)
    assert "CFG scale: 7" in _webui_infotext(plain)


def test_an_x_y_z_cell_after_a_colorized_one_gets_its_cfg_scale_back(webui, sd_model):
    p = webui.txt2img(enabled())
    webui.run(p)
    p.script_args = webui.script_args(None)                   # X/Y/Z: the next cell on a copy sharing the dict
    webui.run(p)
    assert lifecycle.CFG_SCALE_KEY not in p.extra_generation_params


# ------------------------------------------------------------------------ disabled on our checkpoint
def test_disabled_on_a_colorize_checkpoint_gets_a_note(webui, sd_model):
    processed = webui.run(webui.txt2img(None))
    assert lifecycle.NOTICE_DISABLED in processed.comments
    assert np.isfinite(np.asarray(processed.images[0], dtype=np.float32)).all()


def test_disabled_on_a_plain_checkpoint_gets_no_note(webui, sd_model, plain_sd_file):
    from modules import sd_models

    sd_model.sd_checkpoint_info = sd_models.CheckpointInfo(plain_sd_file)
    sd_model.used_config = "v2-inference.yaml"
    processed = webui.run(webui.txt2img(None))
    assert processed.comments == ""


# ------------------------------------------------------------------------------------ heat maps
def test_gallery_heat_maps_show_what_visualize_shows_for_each_group(webui, sd_model):
    from cd_webui import api
    from lib_colorize.manipulation import format_manipulation_sequence
    from lib_colorize.options import parse_manipulations

    groups = [{"target": "red", "anchor": "none", "control": "hair", "scale": 4.0,
               "thresholds": [0.3, 0.5, 0.7, 0.9]},
              {"target": "blue", "anchor": "none", "control": "sky", "scale": 3.0}]
    p = webui.txt2img(enabled(return_heatmap=True, manipulations=groups))
    processed = webui.run(p)
    heatmaps = processed.images[1:]
    assert len(heatmaps) == 2, "one heat map per group"
    parsed = parse_manipulations(groups)
    for i, (group, heatmap) in enumerate(zip(parsed, heatmaps)):
        shown = api.visualize_heatmap(reference_image(), format_manipulation_sequence(parsed[:i]), group.control,
                                      group.thresholds)
        assert heatmap.tobytes() == shown.tobytes(), f"group {i}"


# --------------------------------------------------------------------------------- global RNG
def test_a_first_generation_with_lazy_loading_leaves_the_global_random_state_alone(webui, sd_model):
    """The sketch encoder and both OpenCLIP towers are built on first use (their weights initialised before the
    file's replace them); none of it may move the webui's random state (the webui draws its img2img VAE sample
    from it)."""
    assert cd_model._clip["visual"] is None and cd_model._sketch_cache == {}
    torch.manual_seed(1234)
    np.random.seed(5)
    random.seed(6)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    manipulation = {"target": "red", "anchor": "none", "control": "hair", "scale": 2.0}
    processed = webui.run(webui.txt2img(enabled(injection=True, manipulations=[manipulation],
                                                return_heatmap=True)))
    assert len(processed.images) == 2
    assert cd_model._clip["visual"] is not None and cd_model._clip["text"] is not None
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
