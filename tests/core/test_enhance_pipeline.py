"""Enhance modes in the host-free pipeline: a repeated generation encodes nothing again, image i of a batch is
its generation alone, the modes work with attention injection, manipulation-free pad-with-margin and crop, the
LoRA never outlives a mode (method-enhance Q4), and nothing stays installed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_colorize.checkpoint import load_checkpoint
from lib_colorize.errors import InvalidInput
from lib_colorize.models.clip import load_clip
from lib_colorize.options import ColorizeOptions
from lib_colorize.pipeline import Colorizer, SamplingOptions
from lib_colorize.processors import live_count
from lib_colorize.testing.checkpoints import make_checkpoint
from lib_colorize.testing.clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip
from lib_colorize.testing.masks import make_mask_extractor_files


@pytest.fixture(scope="module")
def colorizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhance-pipeline")
    register_tiny_clip()
    clip = load_clip(TINY_CLIP_NAME, weights=make_tiny_clip_weights(str(root / "clip.bin")), allow_download=False)
    make_mask_extractor_files(root / "ColorizeDiffusion", divisor=16)
    out = {}
    for version, name in (("v1.5", "switch-eps"), ("v2", "v2-full")):
        path = make_checkpoint(root / f"{name}.safetensors", version=version, size="tiny",
                               context_dim=TINY_CLIP_CONFIG["embed_dim"], seed=4)
        out[version] = Colorizer(load_checkpoint(path), clip, allow_download=False,
                                 models_dir=root / "ColorizeDiffusion")
    return out


def options(**changes) -> ColorizeOptions:
    rng = np.random.default_rng(1)
    sketch = np.full((64, 96, 3), 255, np.uint8)
    sketch[::7] = 0
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :40] = 255
    return ColorizeOptions(enabled=True, sketch=Image.fromarray(sketch),
                           reference=Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
                           background=Image.fromarray(rng.integers(0, 255, (56, 40, 3), dtype=np.uint8)),
                           sketch_mask=Image.fromarray(mask), reference_guidance=3.0,
                           sketch_guidance=1.5).replace(**changes)


def sampling(**changes):
    return SamplingOptions(sampler="Euler a", steps=2, seed=11, width=64, height=64, **changes)


def test_repeated_generation_encodes_nothing_again(colorizers):
    colorizer = colorizers["v2"]
    opts = options(style_enhance=True, bg_enhance=True, background=None, return_masks=True)
    first = colorizer.colorize(opts, sampling())
    computed = dict(colorizer.enhance_cache.computed)
    assert {"reference mask", "vae latent", "style encoder", "bg encoder"} <= set(computed)
    clip_calls = colorizer.token_cache.encode_calls
    second = colorizer.colorize(opts, sampling())
    assert colorizer.enhance_cache.computed == computed, "masks, latents and encoders are cached by content"
    assert colorizer.token_cache.encode_calls == clip_calls
    assert torch.equal(first.latents, second.latents)
    assert [m.size for m in first.masks] == [(64, 64), (56, 40)]   # sketch mask, reference mask (padded size)
    other = colorizer.colorize(opts.replace(background_factor=0.5), sampling())
    assert colorizer.enhance_cache.computed["bg encoder"] == computed["bg encoder"] + 1
    assert not torch.allclose(other.latents, first.latents)


@pytest.mark.parametrize("version,mode", [("v2", dict(style_enhance=True, bg_enhance=True)),
                                          ("v1.5", dict(fg_enhance=True, bg_enhance=True))])
def test_batch_image_equals_its_generation_alone_with_injection(colorizers, version, mode):
    colorizer = colorizers[version]
    opts = options(injection=True, pad_reference=1.3, crop_result=True, **mode)
    batch = colorizer.colorize(opts, sampling(batch_size=2))
    alone = colorizer.colorize(opts, SamplingOptions(sampler="Euler a", steps=2, seed=12, width=64, height=64))
    assert torch.equal(batch.latents[1:2], alone.latents)
    assert batch.images[0].size == (64, 42), "crop keeps the sketch's aspect"
    plain = colorizer.colorize(opts.replace(**{k: False for k in mode}), sampling(batch_size=2))
    assert not torch.allclose(plain.latents, batch.latents)
    assert live_count() == 0


def test_a_default_run_after_a_mode_equals_a_fresh_default_run(colorizers):
    """Q4: the original leaves its LoRA in the fg mode after a BG run; here no mode outlives its generation."""
    colorizer = colorizers["v2"]
    fresh = colorizer.colorize(options(), sampling())
    colorizer.colorize(options(bg_enhance=True, fg_enhance=True), sampling())
    assert torch.equal(colorizer.colorize(options(), sampling()).latents, fresh.latents)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in colorizer.unet.modules())


def test_version_and_input_errors_name_the_option(colorizers):
    with pytest.raises(InvalidInput, match=r"style_enhance: needs a v2 \(v2-full\) checkpoint.*v1\.5"):
        colorizers["v1.5"].colorize(options(style_enhance=True), sampling())
    with pytest.raises(InvalidInput, match=r"background_factor: needs a v2"):
        colorizers["v1.5"].colorize(options(background_factor=1.2), sampling())
    with pytest.raises(InvalidInput, match=r"remove_foreground.*background image"):
        colorizers["v2"].colorize(options(bg_enhance=True, background=None, remove_foreground=True), sampling())
    with pytest.raises(InvalidInput, match=r"style_enhance: style enhance needs a reference"):
        colorizers["v2"].colorize(options(style_enhance=True, reference=None), sampling())
