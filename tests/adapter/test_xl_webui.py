"""XL checkpoints in the (stand-in) webui: the extension's XL config with its text-free conditioner, our context
and 512-wide ``y`` in every U-Net call of every pass (hires fix too), the refiner refused, per-model option
checks, XL infotext, and the accordion adapting to the model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference_image, sketch_image
from lib_colorize.conditioning import xl_vector
from lib_colorize.errors import InvalidInput

XL_OPTIONS = {"enabled": True, "reference_guidance": 4.0, "sketch_strength_2": 0.5}


@pytest.fixture(scope="session")
def xl_file(tmp_path_factory):
    from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint

    return make_xl_checkpoint(tmp_path_factory.mktemp("Stable-diffusion") / "sdxl-tiny.safetensors", "sdxl",
                              seed=3)


@pytest.fixture
def xl_model(webui, xl_file, data_dir, monkeypatch):
    import cd_webui.model as cd_model
    from lib_colorize.testing.xl_checkpoints import TINY_BIGG_NAME, make_xl_encoder_weights, register_tiny_bigg

    register_tiny_bigg()
    folder = data_dir / "models" / "ColorizeDiffusion"
    if not (folder / "wd-v14-swin2-tagger.safetensors").exists():
        make_xl_encoder_weights(folder, seed=4)
    monkeypatch.setattr(cd_model, "XL_CLIP_ARCH", TINY_BIGG_NAME)
    return webui.load(xl_file)


def with_images(options):
    return dict(options, sketch=sketch_image(), reference=reference_image())


def run(webui, options, **kwargs):
    kwargs.setdefault("width", 64)
    kwargs.setdefault("height", 64)
    p = webui.txt2img(with_images(options) if options and options.get("enabled") else options, **kwargs)
    return p, webui.run(p)


class Recorder:
    """The ``context`` and ``y`` of every U-Net call (a pre-hook on the U-Net and on ``label_emb``)."""

    def __init__(self, unet):
        self.contexts, self.vectors = [], []
        self.handles = [
            unet.register_forward_pre_hook(lambda m, a: self.contexts.append(a[2].shape)),
            unet.label_emb.register_forward_pre_hook(lambda m, a: self.vectors.append(a[0].detach().clone()))]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_the_xl_config_is_supplied_and_has_no_text_encoder(xl_model, xl_file, tmp_path):
    import cd_webui.model as cd_model
    from cd_webui.xl_conditioner import ReferenceOnlyConditioner

    assert xl_model.used_config == cd_model.XL_CONFIGS["v"] and xl_model.parameterization == "v"
    assert xl_model.is_sdxl and isinstance(xl_model.conditioner, ReferenceOnlyConditioner)
    assert next(xl_model.conditioner.parameters(), None) is None           # nothing resident, nothing downloaded
    cond = xl_model.get_learned_conditioning(["a", "b"])
    assert cond["crossattn"].shape == (2, 1, 64) and cond["vector"].shape == (2, 512)   # the file's widths
    assert ReferenceOnlyConditioner().context_dim == 2048
    assert xl_model.conditioner.process_texts(["x"])[1] == 0
    eps = tmp_path / "sdxl-eps-tiny.safetensors"
    os.link(xl_file, eps)
    assert cd_model.config_for_keys(_keys(xl_file), str(eps)) == cd_model.XL_CONFIGS["eps"]


def _keys(path):
    from lib_colorize.checkpoint import read_safetensors_header

    return list(read_safetensors_header(path))


def test_enabled_xl_gives_our_context_and_y_in_every_call_and_differs_from_disabled(webui, xl_model):
    from modules import shared

    recorder = Recorder(xl_model.model.diffusion_model)
    try:
        p, processed = run(webui, XL_OPTIONS, steps=2)
    finally:
        recorder.remove()
    assert recorder.contexts and all(shape == (2, 196, 64) for shape in recorder.contexts)   # [c | u_ref]
    y = xl_vector(64, 64)
    assert all(torch.allclose(v, y.expand(2, -1), atol=1e-6) for v in recorder.vectors)
    assert len(recorder.vectors) == len(recorder.contexts) == 2
    assert p.extra_generation_params["CD sketch strength 2"] == 0.5
    assert "CD sketch rope" in p.extra_generation_params and "CD layer scales" not in p.extra_generation_params
    _, disabled = run(webui, {"enabled": False}, steps=2)
    a, b = (np.asarray(x.images[0], dtype=np.float64) for x in (processed, disabled))
    assert np.abs(a - b).max() > 0
    assert shared.sd_model is xl_model


def test_hires_fix_pass_gets_the_y_of_its_own_size(webui, xl_model):
    recorder = Recorder(xl_model.model.diffusion_model)
    try:
        run(webui, dict(XL_OPTIONS, reference_guidance=1.0), steps=1, enable_hr=True, hr_scale=2.0,
            hr_second_pass_steps=1, denoising_strength=0.5)
    finally:
        recorder.remove()
    assert [tuple(v.shape) for v in recorder.vectors] == [(1, 512), (1, 512)]
    torch.testing.assert_close(recorder.vectors[0], xl_vector(64, 64))
    torch.testing.assert_close(recorder.vectors[1], xl_vector(128, 128))


@pytest.mark.parametrize("options,field", [({"layer_scales": [0.5] * 16}, "layer_scales"),
                                           ({"level_scales": {"encoder": 1, "middle": 0.3, "low": 1}},
                                            "level_scales.middle"),
                                           ({"manipulations": [{"target": "red", "control": "hair", "scale": 2}]},
                                            "manipulations")])
def test_options_the_xl_model_does_not_use_are_refused_and_nothing_stays_installed(webui, xl_model, options,
                                                                                  field):
    from lib_colorize.processors import live_count

    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        run(webui, dict(XL_OPTIONS, **options))
    assert live_count() == 0


def test_the_refiner_is_refused(webui, xl_model):
    with pytest.raises(InvalidInput, match="refiner"):
        run(webui, XL_OPTIONS, refiner_checkpoint="sd_xl_refiner_1.0.safetensors")


def test_an_sd21_model_refuses_xl_options(webui, sd_model):
    with pytest.raises(InvalidInput, match="sketch_strength_2: applies to XL"):
        run(webui, XL_OPTIONS)


def test_the_accordion_adapts_to_the_model():
    from cd_webui.ui import ADAPTIVE_PARTS, visibility_for

    def shown(version):
        return {part: update["visible"] for (part, _), update in zip(ADAPTIVE_PARTS, visibility_for(version))}

    assert shown("sdxl") == {"xl_row": True, "layers_accordion": False, "manipulation_accordion": False,
                             "return_heatmap": False, "level_scales.middle": False, "level_scales.low": False}
    assert shown("xlv2")["level_scales.low"] and not shown("xlv2")["layers_accordion"]
    assert shown("v1") == {"xl_row": False, "layers_accordion": True, "manipulation_accordion": True,
                           "return_heatmap": True, "level_scales.middle": True, "level_scales.low": True}
    assert all(shown(None).values())


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_use_sketch_size_for_xl_is_the_autofit_rule():
    from lib_colorize.preprocess import autofit_size

    js = Path(__file__).resolve().parents[2] / "javascript" / "colorize_diffusion.js"
    sizes = [(200, 150), (1000, 1000), (100, 1000), (1920, 1080), (777, 333)]
    script = (f"globalThis.window = globalThis; require({str(js)!r});"
              f"console.log(JSON.stringify({json.dumps(sizes)}.map(s => window.colorizeDiffusionAutofitXL(...s))));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == [list(autofit_size(s)) for s in sizes]


def test_paste_of_an_xl_infotext_restores_the_xl_slots():
    from modules import infotext_utils

    from cd_webui.args import UI_ORDER, parse_script_args
    from lib_colorize.infotext import format_parameters_text, options_to_infotext
    from lib_colorize.options import ColorizeOptions
    from test_ui_args import build, pasted_slots

    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference_guidance=4.0, sketch_strength_1=0.4,
                              sketch_strength_4=2.5, sketch_rope="rotation")
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 1, **options_to_infotext(options, "sdxl")}
    parsed = infotext_utils.parse_generation_parameters(format_parameters_text("", params))
    script, components = build()
    slots = pasted_slots(script, components, parsed)
    assert slots["sketch_strength_1"] == 0.4 and slots["sketch_rope"] == "rotation"
    values = dict(zip(UI_ORDER, (c.value for c in components)))
    values.update({slot: v for slot, v in slots.items() if v is not None}, sketch=options.sketch)
    got = parse_script_args([values[slot] for slot in UI_ORDER])
    assert got.replace(sketch=None) == options.replace(sketch=None)


@pytest.fixture(scope="session")
def xlv2_file(tmp_path_factory):
    from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint

    return make_xl_checkpoint(tmp_path_factory.mktemp("Stable-diffusion") / "xlv2-tiny.safetensors", "xlv2",
                              seed=5)


def _mask(size, box):
    from PIL import Image, ImageDraw

    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    return image


def test_xlv2_low_level_injection_runs_in_the_webui(webui, xl_model, xlv2_file):
    from lib_colorize.processors import live_count

    model = webui.load(xlv2_file)
    assert model.is_sdxl
    sketch, reference = sketch_image(), reference_image()
    options = dict(XL_OPTIONS, bg_enhance=True, merging_scale=0.2,
                   sketch_mask=_mask(sketch.size, (10, 10, 60, 50)), reference_mask=_mask(reference.size, (5, 5, 40, 50)))
    reads = []
    blocks = [b for b in model.model.diffusion_model.output_blocks.modules() if hasattr(b, "attn1")]
    handle = blocks[0].attn1.register_forward_hook(lambda m, a, o: reads.append(o.shape))
    try:
        p, processed = run(webui, options, steps=1)
    finally:
        handle.remove()
    assert processed.images and reads and live_count() == 0
    assert p.extra_generation_params["CD BG enhance"] is True
    with pytest.raises(InvalidInput, match="injection"):
        run(webui, dict(options, injection=True), steps=1)
