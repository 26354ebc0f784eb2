"""The Forge adapter (``cd_forge``) on Forge 2's patch API (``conftest.py`` says which backend: Forge's own, its
files over stubs, or the stand-in).

The reference for every result is the AUTOMATIC1111 path: :func:`lib_colorize.denoiser.guided_call` over
lib_colorize's own U-Net with the same weights, which the webui adapter's tests check against the webui.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
import torch
from PIL import Image, ImageDraw

from .forge_env import CONTEXT_DIM, REPO
from .forge_host import Engine, ForgeRun, host_engine, image_noise

from cd_forge import lifecycle, model as forge_model, sampling as forge_sampling
from cd_forge.host import LDM_PATCHED, LDM_PATCHED_MESSAGE
from cd_forge.ui import CHECKPOINT_SLOT, split_args
from cd_webui.args import UI_ORDER
from lib_colorize import conditioning
from lib_colorize.denoiser import guided_call, k_noised_reference
from lib_colorize.errors import ColorizeError, InvalidInput, NotColorizeModel
from lib_colorize.guidance import cross_attention_scales
from lib_colorize.options import ColorizeOptions
from lib_colorize.processors import for_generation, live_count


# ---------------------------------------------------------------------------------------------------- inputs
def _sketch(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.2, size * 0.2, size * 0.8, size * 0.8), outline="black", width=3)
    draw.line((0, size - 1, size - 1, 0), fill="black", width=2)
    return image


def _reference(size=64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            pixels[x, y] = (x * 255 // size, y * 255 // size, 160)
    return image


def _options(**values) -> dict:
    return dict(enabled=True, sketch=_sketch(), reference=_reference(), **values)


@pytest.fixture(scope="module")
def plain_sd_file(tmp_path_factory) -> str:
    from lib_colorize.testing.checkpoints import make_sd_checkpoint

    return make_sd_checkpoint(str(tmp_path_factory.mktemp("plain") / "sd21-tiny.safetensors"))


@pytest.fixture
def forge_webui(monkeypatch, tmp_path, checkpoint_file, plain_sd_file):
    """The stand-in webui's ``modules`` with Forge's checkpoint list, tiny OpenCLIP weights, the guard and our
    placement installed (as ``cd_forge.script.register`` does); everything is undone afterwards."""
    import cd_webui.model as shared_model
    from lib_colorize.testing.clip import TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip
    from modules import paths, sd_models, shared

    register_tiny_clip()
    models = tmp_path / "models"
    make_tiny_clip_weights(str(models / "ColorizeDiffusion" / "open_clip_pytorch_model.safetensors"), seed=3)
    monkeypatch.setattr(paths, "models_path", str(models))
    monkeypatch.setattr(shared_model, "CLIP_ARCH", TINY_CLIP_NAME)
    shared_model.clear_caches(clip_too=True)
    shared.opts.reset()
    shared.cmd_opts.colorize_dir = None
    infos = {}
    for path in (plain_sd_file, checkpoint_file):
        info = sd_models.CheckpointInfo(path)
        infos[info.title] = info
    plain = infos[sd_models.CheckpointInfo(plain_sd_file).title]

    def closest(name):
        return next((i for i in infos.values() if name in (i.title, i.name, i.model_name)), None)

    def select_checkpoint():
        return closest(getattr(shared.opts, "sd_model_checkpoint", None) or "") or plain

    monkeypatch.setattr(sd_models, "checkpoints_list", infos, raising=False)
    monkeypatch.setattr(sd_models, "get_closet_checkpoint_match", closest, raising=False)
    monkeypatch.setattr(sd_models, "select_checkpoint", select_checkpoint, raising=False)
    monkeypatch.setattr(sd_models.model_data, "forge_loading_parameters", {"checkpoint_info": plain}, raising=False)
    monkeypatch.setattr(sd_models.model_data, "sd_model", None)
    monkeypatch.setattr(shared_model, "placement", forge_model.forge_placement)
    forge_model.install_checkpoint_guard()
    forge_model.release_colorize_model()
    yield types.SimpleNamespace(infos=infos, plain=plain, engine=host_engine(plain_sd_file))
    forge_model.uninstall_checkpoint_guard()
    forge_model.release_colorize_model()
    assert live_count() == 0
    shared.opts.reset()


def _args(options: dict | None, checkpoint=None) -> list:
    """Script args as Forge's API pads them: the named dict, then the UI defaults (None here)."""
    named = dict(options) if options is not None else {"enabled": False}
    if checkpoint is not None:
        named["checkpoint"] = checkpoint
    return [named] + [None] * CHECKPOINT_SLOT


# ---------------------------------------------------------------------------------------- the host family
@pytest.mark.parametrize("packages, expected", [
    ((), "a1111"),
    (("modules_forge", "backend/patcher/unet.py"), "forge"),
    (("modules_forge", "ldm_patched"), "ldm_patched"),
])
def test_host_family_from_the_import_system(tmp_path, packages, expected):
    for package in packages:
        target = tmp_path / package
        if package.endswith(".py"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("")
        else:
            target.mkdir(parents=True)
            (target / "__init__.py").write_text("")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]
        from cd_forge.host import family
        print(family())
        assert not any(name == "modules" or name.startswith("modules.") for name in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == expected


# ----------------------------------------------------------------------------------------------- our models
def test_our_unet_and_vae_equal_lib_colorize_models(colorize, checkpoint_file):
    from lib_colorize.checkpoint import load_checkpoint

    reference = load_checkpoint(checkpoint_file, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, CONTEXT_DIM, generator=generator)
    t = torch.tensor([500.0, 20.0])
    ours = colorize.diffusion_model(x, t, context=context, transformer_options={})
    assert torch.allclose(ours, reference.unet(x, t, context), atol=2e-5)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    posterior = colorize.encode_posterior(image)
    expected = reference.vae.encode(image)
    assert torch.allclose(posterior.mean, expected.mean, atol=2e-5)
    assert torch.allclose(posterior.std, expected.std, atol=2e-5)
    assert colorize.parameterization == "eps" and colorize.predictor.prediction_type == "epsilon"


def test_v_checkpoint_gets_a_v_predictor(v_checkpoint_file):
    forge_model.release_colorize_model()
    try:
        assert forge_model.load_colorize_model(v_checkpoint_file).predictor.prediction_type == "v_prediction"
    finally:
        forge_model.release_colorize_model()


# -------------------------------------------------------------------------------- the patches, one evaluation
def _plan(colorize, generator_seed=3, **values):
    options = ColorizeOptions.from_dict(_options(**values))
    sketch = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(generator_seed)) * 2 - 1
    reference = sketch.flip(-1) if options.injection else None
    hints, blank, injection_hints = conditioning.encode_sketch_hints(
        colorize.sketch_encoder, sketch, options.sketch_strength, reference, options.injection_sketch_fidelity)
    tokens = torch.randn(1, 9, CONTEXT_DIM, generator=torch.Generator().manual_seed(5))
    injection = None
    if options.injection:
        injection = conditioning.build_injection(options, colorize.encode_posterior, reference, injection_hints,
                                                 [11, 12], dtype=torch.float32)
    plan = conditioning.build_plan(options, sketch_hints=hints, blank_hints=blank, tokens=tokens, injection=injection)
    scales = cross_attention_scales(options.reference_strength, options.level_scales, options.layer_scales)
    return plan, scales


def _reset_generators(plan, states):
    if plan.injection is not None:
        for generator, state in zip(plan.injection.noise_generators, states):
            generator.set_state(state)


def _generator_states(plan):
    return [g.get_state() for g in plan.injection.noise_generators] if plan.injection is not None else []


def _forge_step(colorize, plan, processors, x, sigma, *, uncond: bool, cond_scale=7.0, model_options_hook=None):
    """One denoiser evaluation through Forge's ``sampling_function`` on a clone of our U-Net with our patches."""
    from backend.sampling.condition import ConditionCrossAttn
    from backend.sampling.sampling_function import sampling_function

    unet = colorize.unet.clone()
    forge_pass = forge_sampling.ForgePass(plan, processors, colorize.predictor)
    forge_sampling.install(unet, forge_pass, ConditionCrossAttn)
    if model_options_hook is not None:
        model_options_hook(unet)
    engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet))
    denoiser = types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=engine),
                                     p=types.SimpleNamespace(seeds=[1]))
    batch = x.shape[0]
    text = torch.randn(batch, 77, 16)
    params = types.SimpleNamespace(x=x, sigma=sigma, text_cond=text, image_cond=None,
                                   text_uncond=torch.zeros_like(text) if uncond else None)
    denoised = sampling_function(denoiser, params, cond_scale, [[(i, 1.0)] for i in range(batch)])[0]
    return denoised, forge_pass


CASES = {
    "reference": {},
    "sketch": dict(reference_guidance=1.0, sketch_guidance=2.5),
    "both": dict(reference_guidance=4.0, sketch_guidance=2.0),
    "none": dict(reference_guidance=1.0, sketch_guidance=1.0),
    "window closed": dict(guidance_start=0.8),
    "layer scales": dict(layer_scales=[0.0, 0.5] * 8, sketch_guidance=1.5),
    "injection": dict(injection=True, injection_reference_fidelity=0.5, injection_sketch_fidelity=0.7,
                      sketch_guidance=2.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("uncond", [True, False], ids=["cfg7", "cfg1-no-uncond"])
def test_forge_step_equals_the_a1111_denoiser_on_lib_colorize_unet(colorize, checkpoint_file, case, uncond):
    """Forge's sampling_function with our three patches on Forge's U-Net gives the dual-guidance result of
    guided_call on lib_colorize's U-Net (so the processors work on Forge's modules), also where Forge passes no
    uncond (CFG 1, the hires pass)."""
    from lib_colorize.checkpoint import load_checkpoint
    from lib_colorize.schedule import make_denoiser

    reference_model = load_checkpoint(checkpoint_file, dtype=torch.float32)
    plan, scales = _plan(colorize, **CASES[case])
    injecting = plan.injection is not None
    ours = for_generation(colorize.diffusion_model, scales, injecting).install()
    theirs = for_generation(reference_model.unet, scales, injecting).install()
    try:
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 4
        sigma = colorize.predictor.sigmas[700].expand(2).clone()
        states = _generator_states(plan)
        denoised, forge_pass = _forge_step(colorize, plan, ours, x, sigma, uncond=uncond,
                                           cond_scale=7.0 if uncond else 1.0)
        _reset_generators(plan, states)
        # Forge gives the U-Net the nearest integer timestep (its predictor's argmin)
        schedule_denoiser = make_denoiser(lambda x_in, t, context: reference_model.unet(x_in, t, context), "eps",
                                          quantize=True)
        expected = guided_call(plan, theirs, lambda a, s, c: schedule_denoiser(a, s, context=c), x, sigma,
                               colorize.predictor.timestep(sigma[:1]),
                               noised_reference=k_noised_reference(colorize.predictor.sigmas,
                                                                   colorize.predictor.timestep))
    finally:
        ours.remove()
        theirs.remove()
    assert torch.allclose(denoised, expected, atol=1e-4, rtol=1e-4), (denoised - expected).abs().max()
    assert forge_pass.stats["steps"] == 1 and forge_pass.stats["wrapper_calls"] == 1
    assert forge_pass.stats["created_uncond"] == (0 if uncond else 1)


def test_separate_chunk_calls_evaluate_once(colorize, monkeypatch):
    """When Forge finds too little memory it sends COND and UNCOND in separate wrapper calls: the second is
    answered from the step's outputs, and the result is the same."""
    plan, scales = _plan(colorize, sketch_guidance=2.0)
    processors = for_generation(colorize.diffusion_model, scales).install()
    try:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
        sigma = colorize.predictor.sigmas[500].expand(1).clone()
        together, _ = _forge_step(colorize, plan, processors, x, sigma, uncond=True)
        calls_together = plan.stats["unet_calls"]
        monkeypatch.setattr(colorize.unet.model, "memory_required", lambda shape: float("inf"))
        separate, forge_pass = _forge_step(colorize, plan, processors, x, sigma, uncond=True)
    finally:
        processors.remove()
    assert forge_pass.stats["wrapper_calls"] == 2
    assert plan.stats["unet_calls"] == 2 * calls_together
    assert torch.equal(separate, together)


# -------------------------------------------------------------------------------------------------- conflicts
def _extension_patch(tmp_path, extension: str, source: str):
    """A function defined in a file of ``extensions/<extension>/`` (as another extension's patch would be)."""
    folder = tmp_path / "extensions" / extension / "lib"
    folder.mkdir(parents=True)
    (folder / "patch.py").write_text(textwrap.dedent(source))
    namespace = {}
    code = compile((folder / "patch.py").read_text(), str(folder / "patch.py"), "exec")
    exec(code, namespace)  # noqa: S102 - the test's own source
    return namespace


def test_a_later_attention_replace_names_the_extension(colorize, tmp_path):
    patch = _extension_patch(tmp_path, "sd_forge_ipadapter", """
        def cross_attention(q, k, v, extra):
            return q
    """)["cross_attention"]
    plan, scales = _plan(colorize)
    processors = for_generation(colorize.diffusion_model, scales).install()
    x = torch.randn(1, 4, 8, 8)
    sigma = colorize.predictor.sigmas[500].expand(1).clone()
    try:
        with pytest.raises(forge_sampling.PatchConflict, match="sd_forge_ipadapter.*cross-attention"):
            _forge_step(colorize, plan, processors, x, sigma, uncond=True,
                        model_options_hook=lambda unet: unet.set_model_attn2_replace(patch, "input", 1))
    finally:
        processors.remove()


def test_a_later_wrapper_or_cfg_function_is_a_conflict(colorize, tmp_path):
    functions = _extension_patch(tmp_path, "sd_forge_other", """
        def wrapper(apply_model, args):
            return apply_model(args["input"], args["timestep"], **args["c"])

        def cfg(args):
            return args["cond"]
    """)
    plan, scales = _plan(colorize)
    processors = for_generation(colorize.diffusion_model, scales).install()
    x = torch.randn(1, 4, 8, 8)
    sigma = colorize.predictor.sigmas[500].expand(1).clone()
    try:
        for hook, what in ((lambda u: u.set_model_unet_function_wrapper(functions["wrapper"]), "U-Net call"),
                           (lambda u: u.set_model_sampler_cfg_function(functions["cfg"]), "guidance")):
            with pytest.raises(forge_sampling.PatchConflict, match=f"sd_forge_other.*{what}"):
                _forge_step(colorize, plan, processors, x, sigma, uncond=True, model_options_hook=hook)
    finally:
        processors.remove()


def test_earlier_patches_on_the_host_unet_are_carried_over_or_refused(colorize, tmp_path):
    functions = _extension_patch(tmp_path, "sd_forge_freeu", """
        calls = []

        def output_block(h, hsp, transformer_options):
            calls.append(transformer_options["block"])
            return h, hsp

        def self_attention(q, k, v, extra):
            return q
    """)
    host = colorize.unet.clone()          # stands for the host's U-Net after LoRA
    found = host.clone()                  # what our hook finds: another extension patched it already
    found.set_model_output_block_patch(functions["output_block"])
    ours = colorize.unet.clone()
    forge_sampling.carry_over(ours, found, host)
    assert ours.model_options["transformer_options"]["patches"]["output_block_patch"] == [functions["output_block"]]
    found.set_model_replace_all(functions["self_attention"], "attn1")
    with pytest.raises(forge_sampling.PatchConflict, match="sd_forge_freeu.*self-attention"):
        forge_sampling.carry_over(colorize.unet.clone(), found, host)
    controlled = host.clone()
    controlled.controlnet_linked_list = functions["self_attention"]
    with pytest.raises(forge_sampling.PatchConflict, match="ControlNet"):
        forge_sampling.carry_over(colorize.unet.clone(), controlled, host)


# ------------------------------------------------------------------------------------------ whole generations
def _a1111_latents(colorize, run: ForgeRun, options: dict, reference_unet) -> torch.Tensor:
    """The same generation through guided_call on lib_colorize's U-Net (the AUTOMATIC1111 path)."""
    from lib_colorize.schedule import make_denoiser

    values = ColorizeOptions.from_dict(options)
    state = lifecycle.ForgeGenerationState(options=values, info=colorize.info)
    from cd_webui.lifecycle import prepare_conditioning, prepare_pass

    prepare_conditioning(state, reference_unet)
    p = types.SimpleNamespace(seeds=run.p.seeds, seed=run.p.seed)
    latent = run.size // 8
    noise = image_noise(run.p.seeds, (4, latent, latent))
    sigmas = run.sigmas(run.steps)
    x = noise * sigmas[0]
    plan, processors = prepare_pass(p, state, x, reference_unet, colorize.sketch_encoder, colorize.encode_posterior,
                                    vae_dtype=torch.float32, device=torch.device("cpu"), dtype=torch.float32)
    denoiser = make_denoiser(lambda x_in, t, context: reference_unet(x_in, t, context), "eps", quantize=True)
    try:
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i].expand(run.batch)
            denoised = guided_call(plan, processors, lambda a, s, c: denoiser(a, s, context=c), x, sigma,
                                   colorize.predictor.timestep(sigma[:1]),
                               noised_reference=k_noised_reference(colorize.predictor.sigmas,
                                                                   colorize.predictor.timestep))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    finally:
        processors.remove()
    return x


@pytest.mark.parametrize("values, batch", [({}, 1), (dict(injection=True, sketch_guidance=2.0), 2)],
                         ids=["reference-b1", "injection-b2"])
def test_generation_equals_the_a1111_path_and_leaves_nothing(forge_webui, checkpoint_file, values, batch):
    from lib_colorize.checkpoint import load_checkpoint

    engine = forge_webui.engine
    host_unet, host_vae = engine.forge_objects.unet, engine.forge_objects.vae
    options = _options(**values)
    run = ForgeRun(engine, _args(options), batch=batch).run()
    colorize = forge_model.loaded_colorize_model()
    assert colorize is not None and colorize.name == "mult-eps-tiny"
    expected = _a1111_latents(colorize, run, options, load_checkpoint(checkpoint_file).unet)
    assert torch.allclose(run.latents, expected, atol=1e-4, rtol=1e-4), (run.latents - expected).abs().max()
    # our VAE decoded it; afterwards forge_objects hold the host's U-Net and VAE again, no hook is left
    assert run.images.shape == (batch, 64, 64, 3)
    assert engine.forge_objects.unet is host_unet and engine.forge_objects.vae is host_vae
    assert live_count() == 0
    assert run.p.extra_generation_params["CD checkpoint"] == "mult-eps-tiny"
    assert run.p.extra_generation_params["CD enabled"] is True


def test_batch_images_equal_their_single_generations(forge_webui):
    options = _options(injection=True)
    both = ForgeRun(forge_webui.engine, _args(options), batch=2, seed=21).run()
    first = ForgeRun(forge_webui.engine, _args(options), batch=1, seed=21).run()
    second = ForgeRun(forge_webui.engine, _args(options), batch=1, seed=22).run()
    assert torch.equal(both.latents[0:1], first.latents) and torch.equal(both.latents[1:2], second.latents)
    # our VAE decodes one image at a time: the pixels agree bit for bit too
    assert torch.equal(both.images[0:1], first.images) and torch.equal(both.images[1:2], second.images)


def test_hires_pass_skips_the_call_before_the_reset_and_creates_uncond(forge_webui):
    passes = []

    def observe(run, x, sigma):
        state = lifecycle.get_state(run.p)
        if not any(seen is state.forge_pass for seen in passes):
            passes.append(state.forge_pass)

    run = ForgeRun(forge_webui.engine, _args(_options()), hires=True, observe=observe).run()
    state = lifecycle.get_state(run.p)
    assert state.passes == 2 and len(passes) == 2
    assert passes[1].stats["created_uncond"] == 2 and passes[0].stats["created_uncond"] == 0
    assert run.latents.shape[-1] == 12 and live_count() == 0


def test_disabled_generation_is_untouched(forge_webui):
    engine = forge_webui.engine
    objects = engine.forge_objects
    run = ForgeRun(engine, _args(None))
    run.run()
    assert lifecycle.get_state(run.p) is None
    assert forge_model.loaded_colorize_model() is None
    assert engine.forge_objects.unet is objects.unet and engine.forge_objects.vae is objects.vae
    assert not any(key.startswith("CD ") for key in run.p.extra_generation_params)


def test_bad_input_is_refused_with_its_name_and_nothing_is_left(forge_webui):
    run = ForgeRun(forge_webui.engine, _args(_options(reference_guidance=99)))
    with pytest.raises(InvalidInput, match="reference_guidance"):
        run.run()
    assert live_count() == 0


def test_preparation_error_stops_at_the_first_step(forge_webui, monkeypatch):
    def fail(*args, **kwargs):
        raise InvalidInput("sketch", "cannot be read")

    monkeypatch.setattr(lifecycle.shared_lifecycle, "prepare_pass", fail)
    run = ForgeRun(forge_webui.engine, _args(_options()))
    with pytest.raises(InvalidInput, match="cannot be read"):
        run.run()
    assert live_count() == 0


# ------------------------------------------------------------------------------------- checkpoints and hosts
def test_checkpoint_choice(forge_webui, checkpoint_file, tmp_path, monkeypatch):
    from modules import shared

    assert forge_model.colorize_checkpoints() == {"mult-eps-tiny": checkpoint_file}
    assert forge_model.resolve_checkpoint("Automatic") == checkpoint_file
    assert forge_model.resolve_checkpoint("mult-eps-tiny.safetensors [0123abcd]") == checkpoint_file
    with pytest.raises(InvalidInput, match="no ColorizeDiffusion checkpoint named 'other'.*mult-eps-tiny"):
        forge_model.resolve_checkpoint("other")
    # a path from an API client is never opened: only the name counts
    assert forge_model.resolve_checkpoint("/elsewhere/mult-eps-tiny.safetensors") == checkpoint_file
    with pytest.raises(InvalidInput, match="no ColorizeDiffusion checkpoint named"):
        forge_model.resolve_checkpoint(str(tmp_path / "unlisted.safetensors"))
    second = tmp_path / "models" / "ColorizeDiffusion" / "mult-second.safetensors"
    second.write_bytes(open(checkpoint_file, "rb").read())
    with pytest.raises(InvalidInput, match="several.*mult-eps-tiny, mult-second"):
        forge_model.resolve_checkpoint("Automatic")
    shared.opts.sd_model_checkpoint = "mult-eps-tiny.safetensors"   # chosen in Forge's own list
    assert forge_model.resolve_checkpoint("Automatic") == checkpoint_file
    monkeypatch.setattr(forge_model, "colorize_checkpoints", dict)
    shared.opts.sd_model_checkpoint = None
    with pytest.raises(NotColorizeModel, match="no ColorizeDiffusion checkpoint found"):
        forge_model.resolve_checkpoint("Automatic")


def test_guard_keeps_a_host_when_a_colorize_file_is_chosen(forge_webui, checkpoint_file):
    from modules import sd_models, shared

    shared.opts.sd_model_checkpoint = "mult-eps-tiny.safetensors"
    assert sd_models.select_checkpoint() is forge_webui.plain
    forge_model.uninstall_checkpoint_guard()
    assert sd_models.select_checkpoint().filename == checkpoint_file
    sd_models.model_data.forge_loading_parameters["checkpoint_info"] = sd_models.select_checkpoint()
    forge_model.install_checkpoint_guard()   # a choice saved before the extension loaded is fixed too
    assert sd_models.model_data.forge_loading_parameters["checkpoint_info"] is forge_webui.plain


def test_disabled_generation_with_a_colorize_file_as_main_model_is_refused(forge_webui):
    from modules import shared

    shared.opts.sd_model_checkpoint = "mult-eps-tiny"
    with pytest.raises(NotColorizeModel, match="Enable the ColorizeDiffusion accordion"):
        ForgeRun(forge_webui.engine, _args(None)).run()
    enabled = ForgeRun(forge_webui.engine, _args(_options())).run()   # enabled: it is the "Automatic" choice
    assert enabled.p.extra_generation_params["CD checkpoint"] == "mult-eps-tiny"


@pytest.mark.parametrize("key", ["bg_enhance", "fg_enhance", "style_enhance"])
def test_enhance_modes_are_refused_naming_the_mode_once(forge_webui, monkeypatch, key):
    # the version check would refuse FG / style enhance on the tiny v1 file first; this is Forge's own refusal
    monkeypatch.setattr(lifecycle.shared_lifecycle, "check_model_options", lambda options, info: None)
    with pytest.raises(InvalidInput) as caught:
        ForgeRun(forge_webui.engine, _args(_options(**{key: True}))).run()
    error = caught.value
    assert error.field == key
    assert str(error).count("ColorizeDiffusion") == 2   # the prefix and the sentence, not a doubled prefix
    assert str(error).startswith(f"ColorizeDiffusion: {key}: in Forge, ColorizeDiffusion runs")
    assert "modes (BG / FG / style enhance) run in the AUTOMATIC1111 webui" in str(error)
    assert live_count() == 0


def test_hosts_that_cannot_serve_are_refused(forge_webui):
    engine = forge_webui.engine
    sdxl = Engine(engine.forge_objects.unet, engine.forge_objects.vae, name="sdxl-base", flags=("is_sdxl",))
    with pytest.raises(NotColorizeModel, match="SD 1.x or 2.x.*sdxl-base is another kind"):
        ForgeRun(sdxl, _args(_options())).run()
    shifted = engine.forge_objects.unet.clone()
    shifted.model = types.SimpleNamespace(predictor=types.SimpleNamespace(sigmas=torch.linspace(0.1, 20, 1000)))
    engine.forge_objects_after_applying_lora.unet = shifted
    with pytest.raises(NotColorizeModel, match="noise schedule"):
        forge_model.require_host(engine, forge_model.load_colorize_model(forge_model.resolve_checkpoint(None)))


def test_offload_host_unet_through_the_memory_manager(colorize):
    from backend import memory_management

    class Entry:
        def __init__(self, model, device):
            self.model, self.device, self.unloaded = model, torch.device(device), 0

        def model_unload(self, avoid_model_moving=False):
            self.unloaded += 1

    host = colorize.unet.clone()
    gpu, cpu, other = Entry(host, "cuda"), Entry(host, "cpu"), Entry(types.SimpleNamespace(model=None), "cuda")
    saved = list(memory_management.current_loaded_models)
    memory_management.current_loaded_models[:] = [gpu, cpu, other]
    try:
        forge_model.offload_host_unet(colorize.unet)
        left = list(memory_management.current_loaded_models)
    finally:
        memory_management.current_loaded_models[:] = saved
    assert gpu.unloaded == 1 and left == [cpu, other]


# --------------------------------------------------------------------------------------------- args and forks
def test_split_args_named_positional_and_default():
    named = {"enabled": True, "checkpoint": "mult-eps-ft"}
    shared, choice = split_args([named] + [None] * CHECKPOINT_SLOT)
    assert choice == "mult-eps-ft" and "checkpoint" not in shared[0] and "checkpoint" in named
    assert len(shared) == len(UI_ORDER)
    positional = [True] + [None] * (CHECKPOINT_SLOT - 1) + ["mult-x"]
    assert split_args(positional) == (tuple(positional[:CHECKPOINT_SLOT]), "mult-x")
    assert split_args([True])[1] == "Automatic"


def test_ldm_patched_forks_get_a_clear_message(forge_webui, monkeypatch):
    monkeypatch.setattr(lifecycle, "family", lambda: LDM_PATCHED)
    with pytest.raises(ColorizeError) as error:
        ForgeRun(forge_webui.engine, _args(_options())).run()
    assert str(error.value) == LDM_PATCHED_MESSAGE
    ForgeRun(forge_webui.engine, _args(None)).run()   # disabled: untouched


# --------------------------------------------------------------------------------------------------------- UI
class _Script:
    infotext_fields = None
    paste_field_names = None

    def title(self):
        return "ColorizeDiffusion"

    def elem_id(self, item_id):
        return f"script_txt2img_colorizediffusion_{item_id}"


def test_accordion_has_the_checkpoint_dropdown_last_and_pastes_it(forge_webui):
    gr = pytest.importorskip("gradio")
    if int(gr.__version__.split(".")[0]) != 3:
        pytest.skip(f"gradio {gr.__version__}: the gradio-3 UI builds under gradio 4 only with Forge's shims "
                    "(checked in the real Forge, in a browser)")
    from cd_forge import ui as forge_ui
    from cd_webui import ui as shared_ui

    script = _Script()
    with gr.Blocks():
        components = shared_ui.build_ui(script, False, notice=forge_ui.NOTICE, host_controls=forge_ui.host_controls)
    assert len(components) == len(UI_ORDER) + 1 == CHECKPOINT_SLOT + 1
    dropdown = components[CHECKPOINT_SLOT]
    assert dropdown.choices[0] in ("Automatic", ("Automatic", "Automatic"))
    assert "mult-eps-tiny" in str(dropdown.choices) and dropdown.value == "Automatic"
    assert dropdown.elem_id == "script_txt2img_colorizediffusion_checkpoint"
    paste = dict((id(c), target) for c, target in script.infotext_fields)[id(dropdown)]
    assert paste({"CD checkpoint": "mult-eps-tiny"}) == "mult-eps-tiny" and paste({}) is None
    assert paste({"CD checkpoint": "not-here"}) is None


def test_what_forge_does_not_run_yet_is_refused_with_a_message_and_leaves_nothing(forge_webui, tmp_path):
    """The enhance modes and the XL checkpoints stop the generation with a message that says where they run;
    the next generation colorizes as before."""
    from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint

    with pytest.raises(InvalidInput, match="bg_enhance.*in Forge.*AUTOMATIC1111"):
        ForgeRun(forge_webui.engine, _args(_options(bg_enhance=True))).run()
    assert live_count() == 0
    xl_file = make_xl_checkpoint(str(tmp_path / "sdxl-tiny.safetensors"), "sdxl", "tiny")
    with pytest.raises(ColorizeError, match="in Forge.*the XL checkpoint sdxl-tiny.*AUTOMATIC1111"):
        forge_model.load_colorize_model(xl_file)
    assert live_count() == 0
    good = ForgeRun(forge_webui.engine, _args(_options())).run()
    assert good.p.extra_generation_params["CD checkpoint"] == "mult-eps-tiny"
