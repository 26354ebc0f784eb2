"""The host-free pipeline on small random checkpoints in the released layout: encoder call counts, eps and v
models, and state hygiene (after an interrupt or an exception inside sampling nothing remains, and the next
generation equals a fresh one bit for bit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_colorize.checkpoint import load_checkpoint
from lib_colorize.processors import live_count
from lib_colorize.models.clip import load_clip
from lib_colorize.options import ColorizeOptions, Manipulation
from lib_colorize.pipeline import Colorizer, SamplingOptions
from lib_colorize.samplers import SamplingInterrupted
from lib_colorize.testing.checkpoints import make_checkpoint
from lib_colorize.testing.clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip

from bench.original import OriginalColorizer


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    register_tiny_clip()
    weights = make_tiny_clip_weights(str(tmp_path_factory.mktemp("clip") / "clip.bin"))
    return load_clip(TINY_CLIP_NAME, weights=weights, allow_download=False)


def colorizer_for(tmp_path, clip, name="mult-eps-ft.safetensors", version="v1") -> Colorizer:
    path = make_checkpoint(tmp_path / name, version=version, size="tiny", context_dim=TINY_CLIP_CONFIG["embed_dim"])
    return Colorizer(load_checkpoint(path), clip, allow_download=False)


def images(seed=0):
    rng = np.random.default_rng(seed)
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[rng.integers(0, 64, 8)] = 0
    reference = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    return Image.fromarray(sketch), Image.fromarray(reference)


def options(**changes) -> ColorizeOptions:
    sketch, reference = images()
    return ColorizeOptions(enabled=True, sketch=sketch, reference=reference, reference_guidance=3.0,
                           sketch_guidance=2.0).replace(**changes)


SAMPLING = SamplingOptions(sampler="Euler", steps=3, seed=7, width=64, height=64)


def test_encoders_run_once_and_reference_is_cached_across_generations(tmp_path, clip):
    colorizer = colorizer_for(tmp_path, clip)
    first = colorizer.colorize(options(injection=True, injection_sketch_fidelity=0.5), SAMPLING)
    assert first.stats["sketch_encoder_calls"] == 1      # sketch, blank sketch and reference in one batch
    assert colorizer.token_cache.encode_calls == 1
    second = colorizer.colorize(options(injection=True, injection_sketch_fidelity=0.5), SAMPLING)
    assert colorizer.token_cache.encode_calls == 1, "same reference: no new encode"
    assert torch.equal(first.latents, second.latents)
    other = options(reference=images(1)[1])
    colorizer.colorize(other, SAMPLING)
    assert colorizer.token_cache.encode_calls == 2, "a different reference is encoded, never mixed"


def test_distinct_row_injection_equals_the_original_full_batch_pass(tmp_path, clip):
    colorizer = colorizer_for(tmp_path, clip)
    opts = options(injection=True, injection_reference_fidelity=0.7)
    sampling = SamplingOptions(sampler="Euler", steps=3, seed=3, width=64, height=64, batch_size=1)
    ours = colorizer.colorize(opts, sampling)
    original = OriginalColorizer(colorizer.checkpoint, clip, allow_download=False).colorize(opts, sampling)
    assert (ours.latents - original.latents).abs().max() <= 1e-4 * original.latents.abs().max()
    assert ours.stats["write_rows"] < original.stats["write_rows"]
    plain = colorizer.colorize(options(), sampling)
    assert not torch.allclose(plain.latents, ours.latents)


@pytest.mark.parametrize("sampler,injection", [("Euler a", False), ("Euler a", True), ("DPM2 a", False),
                                               ("DPM++ SDE", False), ("DPM++ 3M SDE", True)])
def test_batch_image_equals_the_single_generation_of_its_seed_bit_for_bit(tmp_path, clip, sampler, injection):
    """Image i of a batch is the generation of seed ``seed + i`` alone: its own initial noise, per-step noise
    (the ancestral samplers' generator stream, the SDE samplers' Brownian tree seeded ``seed + i``), injection
    latent and ε, and the shapes (so the kernels) of a batch of one."""
    colorizer = colorizer_for(tmp_path, clip)
    opts = options(injection=injection, injection_reference_fidelity=0.6)
    batch = colorizer.colorize(opts, SamplingOptions(sampler=sampler, steps=3, seed=11, width=64, height=64,
                                                     batch_size=3))
    for i in range(3):
        single = colorizer.colorize(opts, SamplingOptions(sampler=sampler, steps=3, seed=11 + i, width=64,
                                                          height=64, batch_size=1))
        assert torch.equal(batch.latents[i:i + 1], single.latents), f"image {i}"
        assert batch.images[i].tobytes() == single.images[0].tobytes()
    assert not torch.equal(batch.latents[0], batch.latents[1])


def test_sde_samplers_get_the_webuis_schedule_and_brownian_noise(tmp_path, clip, monkeypatch):
    """DPM++ 3M SDE runs on the webui's sigmas for it (exponential, one step more with the next-to-last dropped)
    with a Brownian tree per image seeded with the image's seed; the noise decides the image."""
    import lib_colorize.samplers as samplers

    colorizer = colorizer_for(tmp_path, clip)
    seen = {}
    info = samplers.SAMPLERS["DPM++ 3M SDE"]

    def recording(model, x, sigmas, **kwargs):
        seen.update(x=x, sigmas=sigmas, **kwargs)
        return info.func(model, x, sigmas, **kwargs)

    monkeypatch.setitem(samplers.SAMPLERS, "DPM++ 3M SDE", info._replace(func=recording))
    sampling = SamplingOptions(sampler="DPM++ 3M SDE", steps=4, seed=21, width=64, height=64, batch_size=2)
    result = colorizer.colorize(options(), sampling)
    assert torch.equal(seen["sigmas"].cpu(), info.sigmas(colorizer.schedule, 4))
    assert "generator" not in seen
    expected = samplers.brownian_tree_noise_sampler(seen["x"], seen["sigmas"], [21, 22])
    sigma, sigma_next = seen["sigmas"][1], seen["sigmas"][2]
    assert torch.equal(seen["noise_sampler"](sigma, sigma_next), expected(sigma, sigma_next))
    monkeypatch.setitem(samplers.SAMPLERS, "DPM++ 3M SDE", info)
    other_noise = colorizer.colorize(options(), SamplingOptions(sampler="DPM++ 3M SDE", steps=4, seed=21, width=64,
                                                                height=64, batch_size=2))
    assert torch.equal(other_noise.latents, result.latents)
    monkeypatch.setitem(samplers.SAMPLERS, "DPM++ 3M SDE", info._replace(noise="generator"))
    per_step = colorizer.colorize(options(), sampling)
    assert not torch.allclose(per_step.latents, result.latents, atol=1e-3), "the Brownian noise must matter"


def test_v_parameterization_model_runs_and_differs_from_eps(tmp_path, clip):
    v2 = colorizer_for(tmp_path, clip, name="v2-full.safetensors", version="v2")
    assert v2.parameterization == "v" and v2.native_size == 768
    result = v2.colorize(options(), SAMPLING)
    assert result.images[0].size == (64, 64) and torch.isfinite(result.latents).all()


def test_interrupt_and_exception_leave_no_state_and_next_generation_is_identical(tmp_path, clip):
    colorizer = colorizer_for(tmp_path, clip)
    opts = options(injection=True, layer_scales=(0.5,) * 16)
    baseline = colorizer.colorize(opts, SAMPLING).latents
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(SamplingInterrupted):
        colorizer.colorize(opts, SAMPLING, interrupt=interrupt)
    assert live_count() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in colorizer.unet.modules())

    def explode(*args):
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        colorizer.colorize(opts, SAMPLING, callback=explode)
    assert live_count() == 0
    assert torch.equal(colorizer.colorize(opts, SAMPLING).latents, baseline)


def test_heatmap_and_extra_outputs(tmp_path, clip):
    colorizer = colorizer_for(tmp_path, clip)
    groups = (Manipulation(target="red", control="hair", scale=2.0),)
    result = colorizer.colorize(options(manipulations=groups, return_sketch=True, return_heatmap=True,
                                        crop_result=True), SAMPLING)
    assert result.heatmap.size == (48, 48)          # the reference's size
    assert result.sketch.size == (64, 64)
    with_manipulation = result.latents
    without = colorizer.colorize(options(), SAMPLING).latents
    assert not torch.equal(with_manipulation, without), "a manipulation with scale > 0 changes the tokens"
