"""The XL models in the host-free pipeline and the command line: size rules (autofit, multiples of 32), the XL
sketch preprocessing, per-version option checks, XL infotext, and a reproducible generation on tiny weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_colorize import cli
from lib_colorize.errors import InvalidInput
from lib_colorize.infotext import options_to_infotext, parse_parameters_text, infotext_to_values
from lib_colorize.options import ColorizeOptions, LevelScales
from lib_colorize.pipeline import Colorizer, SamplingOptions
from lib_colorize.preprocess import autofit_size, prepare_sketch
from lib_colorize.testing.xl_checkpoints import (TINY_BIGG_CONFIG, make_xl_checkpoint, make_xl_encoder_weights,
                                                 register_tiny_bigg)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_xl_encoder_weights(root / "ColorizeDiffusion", seed=5)
    (root / "Stable-diffusion").mkdir()
    checkpoint = make_xl_checkpoint(root / "Stable-diffusion" / "sdxl-tiny.safetensors", "sdxl", seed=6)
    return root, checkpoint


@pytest.fixture(scope="module")
def colorizer(models):
    root, checkpoint = models
    return Colorizer.from_xl_files(checkpoint, models_dir=str(root / "ColorizeDiffusion"),
                                   clip_config=TINY_BIGG_CONFIG)


def sketch_image(size=(90, 60)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), outline="black", width=3)
    return image


REFERENCE = Image.new("RGB", (40, 50), (200, 60, 30))


@pytest.mark.parametrize("size,expected", [((200, 150), (1184, 896)), ((1000, 1000), (1024, 1024)),
                                           ((100, 1000), (768, 1536)), ((1920, 1080), (1376, 768))])
def test_autofit_is_the_xl_apps_rule(size, expected):
    assert autofit_size(size) == expected


def test_output_size_defaults_to_autofit_for_xl_and_takes_multiples_of_32(colorizer):
    options = ColorizeOptions(enabled=True, sketch=sketch_image((200, 150)))
    assert colorizer.output_size(options, SamplingOptions()) == (1184, 896)
    assert colorizer.output_size(options, SamplingOptions(autofit=False)) == (1024, 1024)
    assert colorizer.output_size(options, SamplingOptions(width=224, height=160)) == (224, 160)
    with pytest.raises(InvalidInput, match="multiple of 32"):
        SamplingOptions(width=100, height=96).check(32)
    SamplingOptions(width=96, height=96).check(32)
    with pytest.raises(InvalidInput, match="multiple of 64"):
        SamplingOptions(width=96, height=96).check()               # the SD2.1 rule is unchanged


@pytest.mark.parametrize("mode", ["invert", "none"])
def test_xl_sketch_is_resized_as_an_image_and_pasted_on_white(mode):
    sketch = sketch_image((90, 60))
    x, box = prepare_sketch(sketch, mode, (96, 128), xl=True)
    r = min(96 / 60, 128 / 90)
    w, h = int(90 * r), int(60 * r)
    canvas = Image.new("RGB", (128, 96), "white")
    canvas.paste(sketch.resize((w, h), Image.BICUBIC), ((128 - w) // 2, (96 - h) // 2))
    expected = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    expected = -expected if mode == "invert" else expected
    assert box == ((128 - w) // 2, (96 - h) // 2, w, h)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert float(x[0, 0, 0, 0]) == (-1.0 if mode == "invert" else 1.0)   # the white canvas


def test_options_the_xl_models_do_not_use_are_refused(colorizer):
    base = ColorizeOptions(enabled=True, sketch=sketch_image(), reference=REFERENCE)
    for changes, field in (({"layer_scales": (0.5,) * 16}, "layer_scales"),
                           ({"level_scales": LevelScales(middle=0.5)}, "level_scales.middle"),
                           ({"level_scales": LevelScales(low=0.5)}, "level_scales.low")):
        with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
            colorizer.colorize(base.replace(**changes), SamplingOptions(width=64, height=64, steps=1))
    base.replace(level_scales=LevelScales(low=0.5)).check_version("xlv2")          # xlv2 uses the low scale
    with pytest.raises(InvalidInput, match="sketch_strength_3"):
        base.replace(sketch_strength_3=2.0).check_version("v1")


def test_xl_generation_is_reproducible_and_uses_the_reference_and_the_level_strengths(colorizer):
    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference=REFERENCE, reference_guidance=4.0)
    sampling = SamplingOptions(width=96, height=64, steps=2, seed=3, sampler="Euler")
    first = colorizer.colorize(options, sampling)
    assert (first.width, first.height) == (96, 64) and first.images[0].size == (96, 64)
    assert first.stats["unet_rows"] == 4                      # 2 steps × [c | u_ref]
    again = colorizer.colorize(options, sampling)
    arrays = [np.asarray(r.images[0], dtype=np.float64) for r in (first, again)]
    assert np.array_equal(*arrays)
    for changes in ({"reference": None}, {"sketch_strength_2": 2.5}, {"sketch_rope": "rotation"}):
        other = np.asarray(colorizer.colorize(options.replace(**changes), sampling).images[0], dtype=np.float64)
        assert np.abs(other - arrays[0]).max() > 0, changes


def test_xl_infotext_has_the_xl_keys_and_reads_back():
    options = ColorizeOptions(enabled=True, sketch_strength_4=0.5, sketch_rope="rotation")
    xl = options_to_infotext(options, "sdxl")
    assert xl["CD sketch strength 4"] == 0.5 and xl["CD sketch rope"] == "rotation"
    assert "CD sketch strength 4" not in options_to_infotext(options, "v1")      # not an SD2.1 option
    assert "CD sketch strength 1" not in options_to_infotext(options)            # default: SD2.1 keys as before
    back = infotext_to_values(xl)
    assert back["sketch_strength_4"] == 0.5 and back["sketch_rope"] == "rotation"


def test_cli_runs_xl_and_refuses_an_sd21_option_before_loading(models, tmp_path, capsys):
    root, checkpoint = models
    register_tiny_bigg()
    sketch = tmp_path / "page.png"
    sketch_image().save(sketch)
    reference = tmp_path / "ref.png"
    REFERENCE.save(reference)
    common = ["--checkpoint", str(checkpoint), "--reference", str(reference), "--sketch", str(sketch),
              "--models-dir", str(root), "--offline", "--clip-arch", "cd-tiny-bigg", "--steps", "1",
              "--sampler", "Euler", "--seed", "1"]
    out = tmp_path / "out.png"
    assert cli.main(common + ["--out", str(out), "--width", "96", "--height", "64", "--sketch-strength-1",
                              "0.5"]) == 0
    with Image.open(out) as image:
        params = parse_parameters_text(image.info["parameters"])
    assert params["Size"] == "96x64" and params["CD sketch strength 1"] == "0.5" and "CD sketch rope" in params
    assert "CD layer scales" not in params
    assert cli.main(common + ["--out", str(tmp_path / "bad.png"), "--layer-scales"] + ["0.5"] * 16) == 2
    assert "layer_scales: applies to SD2.1-based" in capsys.readouterr().err
    assert cli.main(common + ["--out", str(tmp_path / "bad.png"), "--width", "100", "--height", "64"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_a_runs_one_reference_is_encoded_before_the_unet_is_loaded(models):
    root, checkpoint = models
    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference=REFERENCE)
    order = []
    import lib_colorize.checkpoint as checkpoint_module

    original = checkpoint_module.load_checkpoint
    try:
        checkpoint_module.load_checkpoint = lambda *a, **k: (order.append("U-Net loaded"), original(*a, **k))[1]
        colorizer = Colorizer.from_xl_files(checkpoint, models_dir=str(root / "ColorizeDiffusion"),
                                            clip_config=TINY_BIGG_CONFIG, encode_first=(options,),
                                            on_stage=order.append)
    finally:
        checkpoint_module.load_checkpoint = original
    assert order == ["references encoded", "U-Net loaded"]
    encoder = colorizer.reference_encoder
    assert encoder.encode_calls == 1 and not encoder._loaded           # encoders dropped after their encode
    colorizer.colorize(options, SamplingOptions(width=64, height=64, steps=1, sampler="Euler"))
    assert encoder.encode_calls == 1 and colorizer.token_cache.hits == 1


def test_attention_injection_runs_on_the_70_xl_blocks_with_y_in_the_reference_pass(colorizer):
    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference=REFERENCE, reference_guidance=4.0)
    sampling = SamplingOptions(width=64, height=64, steps=2, seed=3, sampler="Euler")
    seen = []
    handle = colorizer.unet.label_emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        plain = colorizer.colorize(options, sampling)
        injected = colorizer.colorize(options.replace(injection=True, injection_reference_fidelity=0.7), sampling)
    finally:
        handle.remove()
    assert injected.stats["write_rows"] == 4            # 2 steps × the two distinct contexts of [c | u_ref]
    assert len(seen) == 2 + 4                            # every call, reference passes included, got y
    a, b = (np.asarray(r.images[0], dtype=np.float64) for r in (plain, injected))
    assert np.abs(a - b).max() > 0
