"""The script's lifecycle in a stand-in webui generation (cd_webui.lifecycle, cd_webui.model, cd_webui.api).

Disabled runs are untouched; enabled runs colorize, write infotext and always remove their hooks (after
success, an exception inside sampling, and an interrupt); user errors reach the caller although the script
runner swallows hook exceptions; hires fix re-encodes the sketch; img2img takes the init image as the sketch
and blends masks; checkpoints get the right config; weights, settings, routes and packaging files behave.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, reference_image, sketch_image
from lib_colorize.weights import store as weights_store
from lib_colorize.errors import CheckpointError, InvalidInput, MissingWeights, NotColorizeModel
from lib_colorize.processors import for_generation, live_count
from lib_colorize.infotext import INFOTEXT_KEYS, KEY_ENABLED

import cd_webui.model as cd_model
from cd_webui import lifecycle, sampling


def enabled(**extra):
    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image(),
               "reference_guidance": 3.0, "sketch_guidance": 1.5}
    options.update(extra)
    return options


def cd_keys(p):
    return {k for k in p.extra_generation_params if k.startswith("CD ")}


# ------------------------------------------------------------------------------------------------ disabled
def test_disabled_installs_nothing_and_is_bit_identical(webui, sd_model):
    baseline = webui.txt2img(None, with_script=False, batch_size=2)
    webui.run(baseline)
    p = webui.txt2img({"enabled": False, "sketch": sketch_image()}, batch_size=2)
    p.extra_generation_params["CD enabled"] = True  # stale key from an earlier X/Y/Z cell
    installed = []
    original = lifecycle.process_before_every_sampling

    def spy(p_, *args, **kwargs):
        original(p_, *args, **kwargs)
        installed.append((live_count(), sampling.is_bound(p_.sampler.model_wrap_cfg)))

    lifecycle_spy = pytest.MonkeyPatch()
    lifecycle_spy.setattr(lifecycle, "process_before_every_sampling", spy)
    try:
        webui.run(p)
    finally:
        lifecycle_spy.undo()
    assert installed == [(0, False)]
    assert torch.equal(p.all_samples[0], baseline.all_samples[0])
    assert "sample" not in vars(p) and lifecycle.get_state(p) is None
    assert cd_keys(p) == set()


def test_default_ui_args_are_disabled(webui, sd_model):
    from cd_webui.args import ui_defaults

    p = webui.txt2img(None)
    p.script_args = [0] + list(ui_defaults().values())
    webui.run(p)
    assert lifecycle.get_state(p) is None and cd_keys(p) == set()


# ------------------------------------------------------------------------------------------------- enabled
@pytest.mark.parametrize("injection", [False, True])
def test_batch_image_equals_the_single_generation_of_its_seed(webui, sd_model, injection):
    """Image i of a webui batch is the generation of ``seeds[i]`` alone, bit for bit (injection: its own
    reference latent and ε), also in the second ``n_iter`` batch."""
    options = enabled(injection=injection, injection_reference_fidelity=0.6)
    batch = webui.txt2img(options, batch_size=2, n_iter=2, seed=77, sampler_name="Euler a")
    webui.run(batch)
    samples = torch.cat(batch.all_samples)
    assert samples.shape[0] == 4
    for i in range(4):
        single = webui.txt2img(options, batch_size=1, seed=77 + i, sampler_name="Euler a")
        webui.run(single)
        assert torch.equal(samples[i:i + 1], single.all_samples[0]), f"image {i}"
    assert not torch.equal(samples[0], samples[1])


def test_enabled_run_colorizes_writes_infotext_and_removes_hooks(webui, sd_model):
    from modules import errors

    disabled = webui.txt2img(None, with_script=False)
    webui.run(disabled)
    seen = []
    handle = sd_model.model.diffusion_model.register_forward_pre_hook(lambda m, a: seen.append(live_count()))
    p = webui.txt2img(enabled(injection=True))
    try:
        processed = webui.run(p)
    finally:
        handle.remove()
    assert errors.reported == []
    assert seen and all(count == 1 for count in seen)
    assert live_count() == 0
    assert not torch.equal(p.all_samples[0], disabled.all_samples[0])
    assert p.extra_generation_params[KEY_ENABLED] is True
    assert p.extra_generation_params["CD reference guidance"] == 3.0
    assert p.extra_generation_params["CD injection"] is True
    assert cd_keys(p) <= set(INFOTEXT_KEYS)
    assert len(processed.images) == 1
    state = lifecycle.get_state(p)
    assert state.passes == 1 and state.processors is None
    assert state.context.stats["write_rows"] > 0


def test_positional_args_work_too(webui, sd_model):
    from cd_webui.args import UI_ORDER, ui_defaults

    values = ui_defaults()
    values.update(enabled=True, sketch=sketch_image(), reference=reference_image(), reference_guidance=2.0)
    p = webui.txt2img(None)
    p.script_args = [0] + [values[name] for name in UI_ORDER]
    webui.run(p)
    assert p.extra_generation_params["CD reference guidance"] == 2.0
    assert lifecycle.get_state(p).passes == 1


def test_xyz_override_on_p_wins(webui, sd_model):
    p = webui.txt2img(enabled())
    p.cd_reference_guidance = 6.5
    webui.run(p)
    assert p.extra_generation_params["CD reference guidance"] == 6.5


def test_batch_rows_match_single_images(webui, sd_model):
    """batch 2 with seeds s, s+1 gives the images of two single runs (per-row seeds, row-independent guidance)."""
    p2 = webui.txt2img(enabled(), batch_size=2, seed=50)
    webui.run(p2)
    singles = []
    for seed in (50, 51):
        p1 = webui.txt2img(enabled(), seed=seed)
        webui.run(p1)
        singles.append(p1.all_samples[0])
    assert torch.allclose(p2.all_samples[0], torch.cat(singles), atol=1e-4, rtol=1e-4)


def test_n_iter_wraps_every_batch(webui, sd_model):
    p = webui.txt2img(enabled(), n_iter=2)
    processed = webui.run(p)
    assert len(processed.images) == 2 and lifecycle.get_state(p).passes == 2
    assert live_count() == 0


@pytest.mark.parametrize("sampler_name", ["Euler a", "DPM++ 2M", "DDIM"])
def test_other_samplers_run(webui, sd_model, sampler_name):
    from modules import errors

    p = webui.txt2img(enabled(injection=True), sampler_name=sampler_name)
    webui.run(p)
    assert errors.reported == []
    assert torch.isfinite(p.all_samples[0]).all()
    assert live_count() == 0


# ------------------------------------------------------------------------------------- hooks always removed
def test_hooks_removed_after_an_exception_inside_sampling(webui, sd_model):
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom inside the U-Net")

    handle = sd_model.model.diffusion_model.input_blocks[1].register_forward_pre_hook(explode)
    p = webui.txt2img(enabled())
    try:
        with pytest.raises(RuntimeError, match="boom inside the U-Net"):
            webui.run(p)
    finally:
        handle.remove()
    assert live_count() == 0
    p2 = webui.txt2img(enabled())
    webui.run(p2)  # a clean run afterwards
    assert live_count() == 0


def test_interrupt_then_a_clean_run(webui, sd_model):
    from modules import script_callbacks, shared

    reference_run = webui.txt2img(enabled(), steps=4)
    webui.run(reference_run)

    def interrupt_after_first_step(params):
        if params.sampling_step >= 0 and not shared.state.interrupted:
            shared.state.interrupt()

    script_callbacks.on_cfg_after_cfg(interrupt_after_first_step)
    p = webui.txt2img(enabled(), steps=4)
    processed = webui.run(p)
    assert len(processed.images) == 1  # the webui decodes the last latent
    assert live_count() == 0
    assert lifecycle.get_state(p).context.plan.stats["unet_calls"] == 1
    script_callbacks.remove_callbacks_for_function(interrupt_after_first_step)
    shared.state.reset()
    again = webui.txt2img(enabled(), steps=4)
    webui.run(again)
    assert torch.equal(again.all_samples[0], reference_run.all_samples[0])


def test_leftover_hooks_are_removed_before_the_next_generation(webui, sd_model):
    for_generation(sd_model.model.diffusion_model).install()  # as if a crash had left them
    assert live_count() == 1
    p = webui.txt2img(None)
    webui.run(p)
    assert live_count() == 0


def test_script_unloaded_removes_hooks_and_the_resolver(webui, sd_model):
    from modules import script_callbacks, sd_models_config

    for_generation(sd_model.model.diffusion_model).install()
    assert hasattr(sd_models_config.find_checkpoint_config, "colorize_original")
    script_callbacks.script_unloaded_callback()
    assert live_count() == 0
    assert not hasattr(sd_models_config.find_checkpoint_config, "colorize_original")


# ------------------------------------------------------------------------------------- errors reach the user
@pytest.mark.parametrize("options,kwargs,error,match", [
    ({"enabled": True, "reference": None}, {}, InvalidInput, "no sketch"),
    ({"enabled": True, "sketch": "not base64!"}, {}, InvalidInput, "sketch"),
    ({"enabled": True, "reference_guidance": 99}, {}, InvalidInput, "reference_guidance"),
    (enabled(), {"refiner_checkpoint": "sdxl_refiner.safetensors"}, InvalidInput, "refiner"),
    (enabled(), {"sampler_name": "DDIM CFG++"}, InvalidInput, "DDIM CFG\\+\\+"),
])
def test_user_errors_are_raised_from_sampling(webui, sd_model, options, kwargs, error, match):
    """The runner swallows exceptions in process(); the p.sample wrapper raises them so the API/UI sees them."""
    p = webui.txt2img(options, **kwargs)
    with pytest.raises(error, match=match):
        webui.run(p)
    assert live_count() == 0


def test_not_a_colorize_checkpoint(webui, sd_model, plain_sd_file):
    from modules import sd_models

    sd_model.sd_checkpoint_info = sd_models.CheckpointInfo(plain_sd_file)
    p = webui.txt2img(enabled())
    with pytest.raises(NotColorizeModel, match="plain Stable Diffusion checkpoint"):
        webui.run(p)
    # disabled: the plain model works as usual
    webui.run(webui.txt2img(None))


def test_error_while_preparing_a_pass_is_raised(webui, sd_model, monkeypatch):
    def broken(*args, **kwargs):
        raise CheckpointError("x.safetensors", "sketch encoder unreadable")

    monkeypatch.setattr(cd_model, "sketch_encoder", broken)
    p = webui.txt2img(enabled())
    with pytest.raises(CheckpointError, match="unreadable"):
        webui.run(p)
    assert live_count() == 0


def test_missing_openclip_weights_message(webui, sd_model, tmp_path, monkeypatch):
    import huggingface_hub
    from modules import shared

    calls = []

    def unreachable(**kwargs):
        calls.append(kwargs)
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setattr(weights_store, "unreachable", lambda endpoint=None: None)   # the fake hub is up
    shared.cmd_opts.colorize_dir = str(tmp_path / "empty")
    p = webui.txt2img(enabled())
    with pytest.raises(MissingWeights, match="open_clip_pytorch_model.bin") as info:
        webui.run(p)
    assert "HF_HUB_OFFLINE" in str(info.value) and str(tmp_path / "empty") in str(info.value)
    assert calls == [], "offline: no download is attempted"
    # online: downloaded from the webui's HF endpoint; a failure names the file, the folder and the reason
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(shared, "hf_endpoint", "https://hf-mirror.example")
    with pytest.raises(MissingWeights, match="download failed: OSError: no route to host") as info:
        webui.run(webui.txt2img(enabled()))
    assert ("https://hf-mirror.example/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/"
            "open_clip_pytorch_model.bin") in str(info.value)
    assert [(c["repo_id"], c["filename"], c["endpoint"]) for c in calls] == [
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin", "https://hf-mirror.example")]
    assert shared.state.textinfo is None, "the progress text is cleared after a failed download"
    assert not any((tmp_path / "empty").iterdir()), "a failed download leaves nothing behind"


def test_first_run_download_shows_progress_in_the_webui(webui, sd_model, tmp_path, monkeypatch):
    """The OpenCLIP download of a first generation shows in the progress bar's text (``shared.state.textinfo``,
    what the webui's /internal/progress returns) while it runs, and the generation then goes on with the file."""
    import huggingface_hub
    from lib_colorize.weights import store
    from modules import shared

    from lib_colorize.testing.clip import make_tiny_clip_weights

    seen = []
    source = Path(make_tiny_clip_weights(str(tmp_path / "source.bin"), seed=3))

    def download(repo_id, filename, local_dir, **kwargs):
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"x.{filename}.incomplete"
        partial.parent.mkdir(parents=True)
        data = source.read_bytes()
        for end in (len(data) // 2, len(data)):   # the hub writes a growing partial file, then renames it
            partial.write_bytes(data[:end])
            deadline = time.monotonic() + 5
            while str(format_bytes(end)) not in str(shared.state.textinfo) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(shared.state.textinfo)
        final = Path(local_dir) / filename
        partial.rename(final)
        return str(final)

    from lib_colorize.weights import format_bytes

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(weights_store, "unreachable", lambda endpoint=None: None)   # the fake hub is up
    monkeypatch.setattr(store, "PROGRESS_INTERVAL", 0.01)
    shared.cmd_opts.colorize_dir = str(tmp_path / "fresh")
    processed = webui.run(webui.txt2img(enabled()))
    assert len(processed.images) == 1
    half, full = format_bytes(source.stat().st_size // 2), format_bytes(source.stat().st_size)
    assert seen[0].startswith("ColorizeDiffusion: downloading open_clip_pytorch_model.bin") and half in seen[0]
    assert full in seen[1] and "100%" not in seen[0]
    assert shared.state.textinfo is None
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["open_clip_pytorch_model.bin"]


def test_no_reference_needs_no_openclip(webui, sd_model, tmp_path):
    from modules import shared

    shared.cmd_opts.colorize_dir = str(tmp_path / "empty")
    p = webui.txt2img(enabled(reference=None))
    webui.run(p)
    assert torch.isfinite(p.all_samples[0]).all()


# ------------------------------------------------------------------------------------------ hires and img2img
def test_hires_fix_reencodes_the_sketch_at_the_hires_size(webui, sd_model):
    shapes = []
    encoder = cd_model.sketch_encoder(sd_model)
    handle = encoder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    p = webui.txt2img(enabled(return_sketch=True), enable_hr=True, hr_scale=2.0, denoising_strength=0.6)
    try:
        processed = webui.run(p)
    finally:
        handle.remove()
    assert shapes == [(64, 64), (128, 128)]
    assert p.all_samples[0].shape[-2:] == (16, 16)
    state = lifecycle.get_state(p)
    assert state.passes == 2 and live_count() == 0
    assert processed.images[0].size == (128, 128)
    assert processed.images[1].size == (64, 64)  # the processed sketch (first pass)


def test_crop_result_and_gallery_images(webui, sd_model):
    p = webui.txt2img(enabled(sketch=sketch_image((64, 32)), crop_result=True, return_sketch=True),
                      width=64, height=64)
    processed = webui.run(p)
    assert processed.images[0].size == (64, 32)
    assert len(processed.images) == 2
    # the setting switches the extra images off
    from modules import shared

    shared.opts.data[cd_model.SETTING_GALLERY] = False
    processed = webui.run(webui.txt2img(enabled(return_sketch=True)))
    assert len(processed.images) == 1


def test_heatmap_gallery_image(webui, sd_model):
    manipulation = {"target": "red", "anchor": "none", "control": "hair", "scale": 1.0}
    p = webui.txt2img(enabled(return_heatmap=True, manipulations=[manipulation]))

    class FakeText:
        def validate(self, texts):
            pass

        def encode(self, texts):
            g = torch.Generator().manual_seed(len(texts))
            e = torch.randn(len(texts), 1, 32, generator=g)
            return e / e.norm(dim=-1, keepdim=True)

        def parameters(self):
            yield torch.zeros(1)

        def to(self, *args, **kwargs):
            return self

    cd_model._clip["text"] = FakeText()
    cd_model._load_clip_towers(("visual",))
    processed = webui.run(p)
    assert len(processed.images) == 2
    assert "CD manipulations" in p.extra_generation_params


def test_img2img_init_image_as_sketch_with_mask(webui, sd_model):
    from modules import errors

    init = sketch_image((64, 64))
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1.0  # repaint the right half
    options = {"enabled": True, "reference": reference_image(), "use_init_image": True, "reference_guidance": 3.0}
    p = webui.img2img(options, init_images=[init], mask=mask, denoising_strength=0.8, width=64, height=64)
    webui.run(p)
    assert errors.reported == []
    samples, init_latent = p.all_samples[0], p.init_latent
    assert torch.equal(samples[..., :4], init_latent[..., :4])  # kept half: the original latent
    assert not torch.allclose(samples[..., 4:], init_latent[..., 4:])
    assert p.extra_generation_params["CD sketch hash"] is not None
    assert live_count() == 0


def test_img2img_ddim_blends_before_denoising(webui, sd_model):
    mask = torch.zeros(64, 64)
    mask[:32] = 1.0
    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image()}
    p = webui.img2img(options, init_images=[reference_image((64, 64))], mask=mask, sampler_name="DDIM",
                      denoising_strength=0.7)
    webui.run(p)
    assert torch.equal(p.all_samples[0][..., 4:, :], p.init_latent[..., 4:, :])


def test_img2img_without_sketch_source_is_an_error(webui, sd_model):
    p = webui.img2img({"enabled": True, "reference": reference_image()}, init_images=[sketch_image((64, 64))])
    with pytest.raises(InvalidInput, match="sketch"):
        webui.run(p)


def test_img2img_batch_tab_reuses_p(webui, sd_model):
    """The img2img batch tab calls process_images again with the same p: state and wrapper are reset."""
    options = {"enabled": True, "reference": reference_image(), "use_init_image": True}
    p = webui.img2img(options, init_images=[sketch_image((64, 64))])
    webui.run(p)
    first = lifecycle.get_state(p)
    p.init_images = [sketch_image((48, 64))]
    p.all_samples = []
    webui.run(p)
    assert lifecycle.get_state(p) is not first
    assert getattr(p.sample, "colorize_original").__func__ is type(p).sample
    assert live_count() == 0


# -------------------------------------------------------------------------------------------- model support
def test_config_resolver(webui, tmp_path):
    from lib_colorize.testing.checkpoints import released_layout
    from modules import sd_models, sd_models_config

    v1_keys = dict.fromkeys(released_layout("v1", "tiny"))
    v2_keys = dict.fromkeys(released_layout("v2", "tiny"))
    plain = {"model.diffusion_model.input_blocks.0.0.weight": None, "cond_stage_model.model.x": None}

    def config(keys, name):
        return sd_models_config.find_checkpoint_config(keys, sd_models.CheckpointInfo(str(tmp_path / name)))

    assert config(v1_keys, "mult-eps-ft.safetensors") == cd_model.CONFIGS["eps"]
    assert config(v1_keys, "mult-ft.safetensors") == cd_model.CONFIGS["eps"]  # eps although "eps" is missing
    assert config(v2_keys, "v2-full.safetensors") == cd_model.CONFIGS["v"]
    assert config(plain, "sd21.safetensors") == sd_models_config.config_default
    (tmp_path / "mult-eps-ft.yaml").write_text("model: {}\n")
    assert config(v1_keys, "mult-eps-ft.safetensors") == str(tmp_path / "mult-eps-ft.yaml")  # the user's wins
    cd_model.install_config_resolver()  # idempotent
    assert not hasattr(sd_models_config.find_checkpoint_config.colorize_original, "colorize_original")


def test_configs_are_sd2_with_conv_projections():
    import yaml

    for parameterization, path in cd_model.CONFIGS.items():
        with open(path, encoding="utf-8") as handle:
            params = yaml.safe_load(handle)["model"]["params"]
        assert params["parameterization"] == parameterization
        unet = params["unet_config"]["params"]
        assert unet["use_linear_in_transformer"] is False and unet["context_dim"] == 1024
        assert unet["num_head_channels"] == 64 and unet["channel_mult"] == [1, 2, 4, 4]
        assert params["cond_stage_config"]["params"]["version"] is None  # no text-encoder download
        assert params["conditioning_key"] == "crossattn"


def test_loaded_model_uses_our_config_and_parameterization(webui, checkpoint_file, tmp_path):
    model = webui.load(checkpoint_file)
    assert model.used_config == cd_model.CONFIGS["eps"] and model.parameterization == "eps"
    v2 = tmp_path / "v2-tiny.safetensors"
    shutil.copy(checkpoint_file, v2)  # a v2* name on v1 keys: the keys decide the version (v1 -> eps)
    assert webui.load(str(v2)).parameterization == "eps"


def test_schedule_is_repaired_when_the_file_lacks_it(webui, checkpoint_file, tmp_path):
    from lib_colorize.testing.checkpoints import SCHEDULE_BUFFERS, make_checkpoint

    path = make_checkpoint(str(tmp_path / "mult-eps-noschedule.safetensors"), "v1", "tiny", context_dim=32,
                           seed=1, drop=SCHEDULE_BUFFERS)
    model = webui.load(path)
    good = webui.load(checkpoint_file)
    assert torch.allclose(model.alphas_cumprod, good.alphas_cumprod, atol=1e-7)


def test_missing_text_encoder_gets_constant_weights(webui, checkpoint_file, tmp_path):
    """Released files have no cond_stage_model.*: the webui's uninitialised text tower gets zeros, and its
    LayerNorm biases 1 (finite, non-zero conds: see test_model.py for the webui's emphasis modes)."""
    from lib_colorize.testing.checkpoints import make_checkpoint

    model = webui.load(checkpoint_file)
    assert float(model.cond_stage_model[0].weight.abs().sum()) == 0.0
    assert torch.equal(model.cond_stage_model[1].weight, torch.zeros(8))
    assert torch.equal(model.cond_stage_model[1].bias, torch.ones(8))
    text = {"cond_stage_model.0.weight": torch.randn(16, 8), "cond_stage_model.1.weight": torch.ones(8),
            "cond_stage_model.1.bias": torch.full((8,), 0.5)}
    path = make_checkpoint(str(tmp_path / "mult-eps-withtext.safetensors"), "v1", "tiny", context_dim=32, seed=1,
                           overrides=text)
    model = webui.load(path)
    assert torch.equal(model.cond_stage_model[1].bias, torch.full((8,), 0.5))


def test_sketch_encoder_cache_follows_the_checkpoint(webui, checkpoint_file, tmp_path):
    from lib_colorize.testing.checkpoints import make_checkpoint

    first = cd_model.sketch_encoder(webui.load(checkpoint_file))
    assert cd_model.sketch_encoder() is first  # cached
    other = make_checkpoint(str(tmp_path / "mult-eps-other.safetensors"), "v1", "tiny", context_dim=32, seed=9)
    second = cd_model.sketch_encoder(webui.load(other))
    assert second is not first
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
    webui.load(checkpoint_file)
    assert cd_model._sketch_cache == {}  # invalidated in on_model_loaded


def test_lowvram_keeps_our_modules_on_cpu_and_makes_room(webui, sd_model, monkeypatch):
    from modules import lowvram, shared

    shared.cmd_opts.lowvram = True
    moves = []
    monkeypatch.setattr(cd_model, "compute_device", lambda: torch.device("meta"))
    encoder = cd_model.sketch_encoder(sd_model)
    assert next(encoder.parameters()).device.type == "cpu"
    original_to = encoder.to
    monkeypatch.setattr(encoder, "to", lambda *a, **k: moves.append(a) or encoder)
    before = lowvram.send_calls
    with cd_model.on_device(encoder):
        pass
    assert moves == [(torch.device("meta"),), ("cpu",)]
    assert lowvram.send_calls == before + 1
    monkeypatch.setattr(encoder, "to", original_to)


def test_settings_are_registered(webui):
    from modules import shared

    for key in (cd_model.SETTING_MODELS_DIR, cd_model.SETTING_OFFLOAD, cd_model.SETTING_GALLERY):
        assert shared.opts.data_labels[key].section == cd_model.SETTINGS_SECTION
    shared.opts.data[cd_model.SETTING_MODELS_DIR] = "/some/where"
    assert cd_model.models_dir() == "/some/where"
    shared.cmd_opts.colorize_dir = "/flag/dir"
    assert cd_model.models_dir() == "/flag/dir"


# ---------------------------------------------------------------------------------------------------- API
def _b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_visualize_route(webui, sd_model, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import script_callbacks

    monkeypatch.setattr(cd_model, "encode_text", lambda texts: torch.nn.functional.normalize(
        torch.randn(len(texts), 1, 32, generator=torch.Generator().manual_seed(1)), dim=-1))
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    ok = client.post("/colorize/v1/visualize", json={"reference": _b64(reference_image()), "control": "hair",
                                                     "sequence": "", "thresholds": [0.5, 0.55, 0.65, 0.95]})
    assert ok.status_code == 200, ok.text
    image = Image.open(io.BytesIO(base64.b64decode(ok.json()["image"])))
    assert image.size == reference_image().size
    bad = client.post("/colorize/v1/visualize", json={"reference": "%%%", "control": "hair"})
    assert bad.status_code == 422 and "reference" in bad.json()["detail"]
    bad = client.post("/colorize/v1/visualize", json={"reference": _b64(reference_image()),
                                                      "thresholds": [0.9, 0.1, 0.2, 0.3]})
    assert bad.status_code == 422 and "thresholds" in bad.json()["detail"]


def test_visualize_heatmap_for_the_ui_button(webui, sd_model, monkeypatch):
    from cd_webui import api

    monkeypatch.setattr(cd_model, "encode_text", lambda texts: torch.nn.functional.normalize(
        torch.ones(len(texts), 1, 32), dim=-1))
    rgba = reference_image().convert("RGBA")
    image = api.visualize_heatmap(rgba, "", "hair", (0.5, 0.55, 0.65, 0.95))
    assert image.size == rgba.size
    with pytest.raises(InvalidInput):
        api.visualize_heatmap(None, "", "hair")


# ------------------------------------------------------------------------------------------------ packaging
def _run_install(monkeypatch, installed: set):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    spec = importlib.util.spec_from_file_location("cd_install", REPO / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return calls


def test_install_only_adds_missing_unpinned_packages(monkeypatch):
    assert _run_install(monkeypatch, {"cv2", "safetensors", "huggingface_hub"}) == []
    calls = _run_install(monkeypatch, {"safetensors", "huggingface_hub"})
    assert calls == ["install opencv-python-headless"]
    calls = _run_install(monkeypatch, set())
    for forbidden in ("torch", "torchvision", "gradio", "numpy", "open-clip", "open_clip"):
        assert not any(forbidden in c.split()[1] for c in calls if c.split()[1] != "opencv-python-headless")


def test_preload_adds_the_models_folder_flag():
    import argparse

    spec = importlib.util.spec_from_file_location("cd_preload", REPO / "preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    assert parser.parse_args(["--colorize-dir", "/x"]).colorize_dir == "/x"
    assert parser.parse_args([]).colorize_dir is None


def test_script_is_thin_and_always_visible(webui):
    from modules import scripts

    script = webui.module.ColorizeDiffusionScript()
    assert script.title() == "ColorizeDiffusion"
    assert script.show(False) is scripts.AlwaysVisible and script.show(True) is scripts.AlwaysVisible
    source = (REPO / "scripts" / "colorize_diffusion.py").read_text()
    assert len(source.splitlines()) < 80
