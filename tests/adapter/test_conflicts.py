"""Features that change or break a colorization (cd_webui.conflicts): each is detected while it is enabled, and
either refused, or noted under the image in the UI and refused through the API."""
from __future__ import annotations

import pytest
import torch

from conftest import load_real_webui_module, reference_image, sketch_image
from lib_colorize.errors import InvalidInput
from lib_colorize.processors import live_count

from cd_webui import conflicts


def enabled(**extra):
    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image(),
               "reference_guidance": 3.0, "sketch_guidance": 1.0}
    options.update(extra)
    return options


def with_other_script(webui, p, title: str, args: list):
    """Add an AlwaysVisible script named ``title`` holding ``args`` after ours (as the webui lays out args)."""
    from modules import scripts

    class Other(scripts.Script):
        def title(self):
            return title

    p.scripts.add(Other(), len(args))
    p.script_args = list(p.script_args) + list(args)
    return p


def run_ui_and_api(webui, make_p):
    """(processed of the UI run, error of the same generation through the API)."""
    processed = webui.run(make_p())
    p = make_p()
    p.is_api = True
    with pytest.raises(InvalidInput) as error:
        webui.run(p)
    assert live_count() == 0
    return processed, error.value


# ------------------------------------------------------------------------------------------ Hypertile
@pytest.fixture
def hypertile(webui, sd_model):
    """The webui's own Hypertile (extensions-builtin/hypertile) hooked on the U-Net, as its script does."""
    module = load_real_webui_module("extensions-builtin/hypertile/hypertile.py", "webui_real_hypertile")
    module.hypertile_hook_model(sd_model.model, 64, 64, enable=True, tile_size_max=128, swap_size=1, max_depth=3)
    assert conflicts.hypertile_active(sd_model.model.diffusion_model)
    return module


def test_hypertile_with_injection_is_refused(webui, sd_model, hypertile):
    for is_api in (False, True):
        p = webui.txt2img(enabled(injection=True))
        p.is_api = is_api
        with pytest.raises(InvalidInput) as error:
            webui.run(p)
        assert error.value.field == "hypertile" and "attention injection" in str(error.value)
    assert live_count() == 0


def test_hypertile_without_injection_works(webui, sd_model, hypertile):
    processed = webui.run(webui.txt2img(enabled()))
    assert len(processed.images) == 1 and processed.comments == ""
    hypertile.hypertile_hook_model(sd_model.model, 64, 64, enable=False)
    assert not conflicts.hypertile_active(sd_model.model.diffusion_model)


# -------------------------------------------------------------------------------------- token merging
def test_token_merging_with_injection_is_a_notice_in_the_ui_and_an_error_in_the_api(webui, sd_model):
    sd_model.applied_token_merged_ratio = 0.3          # what sd_models.apply_token_merging records
    processed, error = run_ui_and_api(webui, lambda: webui.txt2img(enabled(injection=True)))
    assert len(processed.images) == 1 and "token merging (ratio 0.3)" in processed.comments
    assert error.field == "token_merging"
    assert webui.run(webui.txt2img(enabled())).comments == ""       # without injection it is the user's trade


# ------------------------------------------------------------------------ ControlNet reference-only
@pytest.mark.parametrize("unit", [{"enabled": True, "module": "reference_only", "model": "None"},
                                  {"module": "reference_adain+attn"}])
def test_controlnet_reference_units_are_refused(webui, sd_model, unit):
    for is_api in (False, True):
        p = with_other_script(webui, webui.txt2img(enabled()), "ControlNet", [unit, {"enabled": False}])
        p.is_api = is_api
        with pytest.raises(InvalidInput) as error:
            webui.run(p)
        assert error.value.field == "controlnet" and unit["module"] in str(error.value)


def test_other_or_disabled_controlnet_units_pass(webui, sd_model):
    units = [{"enabled": True, "module": "canny"}, {"enabled": False, "module": "reference_only"}]
    p = with_other_script(webui, webui.txt2img(enabled()), "ControlNet", units)
    assert len(webui.run(p).images) == 1


# ----------------------------------------------------------------------------- self-attention guidance
def test_self_attention_guidance_is_refused_while_enabled(webui, sd_model):
    p = with_other_script(webui, webui.txt2img(enabled()), "Self Attention Guidance", [True, 0.75, 1.0])
    with pytest.raises(InvalidInput) as error:
        webui.run(p)
    assert error.value.field == "self_attention_guidance"
    p = with_other_script(webui, webui.txt2img(enabled()), "Self Attention Guidance", [False, 0.75, 1.0])
    assert len(webui.run(p).images) == 1


# ----------------------------------------------------------------------------- dynamic thresholding
def test_a_replaced_cfg_combination_is_a_notice_in_the_ui_and_an_error_in_the_api(webui, sd_model, monkeypatch):
    """Dynamic thresholding swaps the sampler's CFGDenoiser for a subclass with its own combine_denoised."""
    from modules import sd_samplers

    original = sd_samplers.create_sampler

    def create_sampler(name, model):
        sampler = original(name, model)
        base = type(sampler.model_wrap_cfg)

        class CustomCFGDenoiser(base):
            def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
                return super().combine_denoised(x_out, conds_list, uncond, cond_scale).clamp(-1, 1)

        sampler.model_wrap_cfg.__class__ = CustomCFGDenoiser
        return sampler

    monkeypatch.setattr(sd_samplers, "create_sampler", create_sampler)
    processed, error = run_ui_and_api(webui, lambda: webui.txt2img(enabled()))
    assert len(processed.images) == 1 and "CustomCFGDenoiser" in processed.comments
    assert error.field == "cfg_combination" and "not applied" in str(error)


def test_no_conflict_means_no_notice(webui, sd_model):
    processed = webui.run(webui.txt2img(enabled(injection=True)))
    assert processed.comments == "" and torch.isfinite(torch.tensor(list(processed.images[0].getdata()))).all()
