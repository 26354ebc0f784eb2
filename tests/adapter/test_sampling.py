"""The CFGDenoiser forward override (cd_webui.sampling) against the shared core and the webui's contract.

* each guidance mode (and injection, and a closed guidance window) gives exactly ``guided_call`` on the same
  inputs, for a k-diffusion denoiser and a timestep (DDIM) denoiser;
* ``batch_cond_uncond`` off gives the same result (one U-Net call per row group);
* interrupt / skip raise ``InterruptedException``; callbacks fire and their edits count; mask blending as the
  webui (after denoising for k-diffusion, before for timestep samplers, through ``on_mask_blend``);
* a whole webui generation (k-diffusion's sampler and ``CompVisDenoiser`` driven as the webui drives them, the
  webui's per-image noise) produces the same latents as the host-free ``lib_colorize.pipeline.Colorizer`` (our
  samplers, schedule and noise) for the same inputs, seed and sampler, on the same ldm U-Net.
"""
from __future__ import annotations

import types

import pytest
import torch

from conftest import CONTEXT_DIM, reference_image, sketch_image
from lib_colorize import conditioning
from lib_colorize.denoiser import InjectionPlan, guided_call
from lib_colorize.guidance import GuidanceMode
from lib_colorize.processors import for_generation, live_count
from lib_colorize.options import ColorizeOptions
from lib_colorize.preprocess import prepare_sketch

from cd_webui import sampling

MODES = {"none": (1.0, 1.0), "reference": (3.0, 1.0), "sketch": (1.0, 2.5), "both": (3.0, 2.5)}


def make_plan(sd_model, reference_guidance, sketch_guidance, *, injection=False, window=(0.0, 1.0),
              fidelity=0.5, size=(64, 64), seed=0):
    """A plan built by the shared core from the checkpoint's sketch encoder (fresh generators each call)."""
    import cd_webui.model as cd_model

    g = torch.Generator().manual_seed(seed)
    sketch, _ = prepare_sketch(sketch_image(), "invert", size)
    encoder = cd_model.sketch_encoder(sd_model)
    injection_reference = torch.rand(1, 3, *size, generator=g) * 2 - 1 if injection else None
    hints, blank, injection_hints = conditioning.encode_sketch_hints(encoder, sketch, 0.8, injection_reference, 0.7)
    tokens = torch.randn(1, 256, CONTEXT_DIM, generator=g)
    inj = None
    if injection:
        inj = InjectionPlan(reference_latents=torch.randn(2, 4, size[0] // 8, size[1] // 8, generator=g),
                            hints=injection_hints, reference_fidelity=fidelity, start=0.0,
                            noise_generators=[torch.Generator().manual_seed(seed + 1 + i) for i in range(2)])
    options = ColorizeOptions(enabled=True, sketch=sketch_image(), reference_guidance=reference_guidance,
                              sketch_guidance=sketch_guidance, guidance_start=window[0], guidance_end=window[1])
    plan = conditioning.build_plan(options, sketch_hints=hints, blank_hints=blank, tokens=tokens, injection=inj)
    scales = [0.5 + i / 32 for i in range(16)]
    processors = for_generation(sd_model.model.diffusion_model, layer_scales=scales, injection=injection)
    return plan, processors


def make_denoiser(webui, sd_model, sampler_name="Euler", p=None):
    from modules import sd_samplers

    sampler = sd_samplers.create_sampler(sampler_name, sd_model)
    p = p if p is not None else webui.txt2img(None, with_script=False)
    p.scripts = p.scripts if p.scripts is not None else None
    sampler.initialize(p)
    return sampler, sampler.model_wrap_cfg


def call_forward(denoiser, x, sigma, batch=None):
    batch = x.shape[0] if batch is None else batch
    c = torch.randn(batch, 77, 32)
    return denoiser(x, sigma, uncond=-c, cond=c, cond_scale=7.0, s_min_uncond=0.0,
                    image_cond=x.new_zeros(batch, 5, 1, 1))


def reference_call(denoiser, plan, hooks, x, sigma, t, noised_reference, batch_together=True):
    image_cond = x.new_zeros(x.shape[0], 5, 1, 1)

    def inner(x_in, sigma_in, context):
        ic = image_cond.repeat(x_in.shape[0] // x.shape[0], 1, 1, 1) if x_in.shape[0] % x.shape[0] == 0 \
            else image_cond[:1].expand(x_in.shape[0], -1, -1, -1)
        return denoiser.inner_model(x_in, sigma_in, cond={"c_crossattn": [context], "c_concat": [ic]})

    return guided_call(plan, hooks, inner, x, sigma, t, noised_reference=noised_reference,
                       batch_together=batch_together)


def original_noised_reference(latent, sigma, noise):
    """The original's reference noising q(r, n) = sqrt(abar_n) r + sqrt(1 - abar_n) eps at n = round(t) (method
    §6.2), as the k-diffusion input that the model's c_in = 1 / sqrt(sigma^2 + 1) turns into it."""
    from modules import shared
    from k_diffusion.external import CompVisDenoiser

    alphas = shared.sd_model.alphas_cumprod.double()
    n = int(CompVisDenoiser(shared.sd_model).sigma_to_t(sigma.reshape(-1)[:1]).round())
    a = alphas[n]
    s = sigma.reshape(-1)[:1].double()
    q = a.sqrt() * latent.double() + (1 - a).sqrt() * noise.double()
    return (q * (s * s + 1).sqrt()).to(latent.dtype)


# ------------------------------------------------------------------------------------- equal to guided_call
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("injection", [False, True])
def test_kdiffusion_forward_equals_guided_call(webui, sd_model, mode, injection):
    rg, sg = MODES[mode]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 3.0
    sigma = torch.full((2,), 2.5)
    sampler, denoiser = make_denoiser(webui, sd_model)
    plan, hooks = make_plan(sd_model, rg, sg, injection=injection)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    with hooks:
        got = call_forward(denoiser, x, sigma)
    plan2, hooks2 = make_plan(sd_model, rg, sg, injection=injection)
    with hooks2:
        expected = reference_call(denoiser, plan2, hooks2, x, sigma, denoiser.inner_model.sigma_to_t(sigma),
                                  sampling.make_noised_reference(denoiser))
    assert plan.mode == GuidanceMode(int(rg > 1) + 10 * int(sg > 1))
    assert torch.equal(got, expected)
    assert denoiser.step == 1
    assert torch.equal(sampler.last_latent, got)  # k-diffusion: x0 prediction of the guided output
    assert plan.stats["unet_calls"] == 2, "one call per image of the batch of 2"
    assert plan.stats["write_rows"] == (2 * len([r for r in ("tokens", "zeros") if r != "zeros" or rg > 1])
                                        if injection else 0)
    assert live_count() == 0


@pytest.mark.parametrize("mode", ["reference", "both"])
def test_timestep_forward_equals_guided_call(webui, sd_model, mode):
    """DDIM: sigma is the timestep, the output eps, the injection input q_sample(r, t)."""
    rg, sg = MODES[mode]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([601.0])
    sampler, denoiser = make_denoiser(webui, sd_model, "DDIM")
    assert sampling.is_timestep_denoiser(denoiser)
    plan, hooks = make_plan(sd_model, rg, sg, injection=True)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    with hooks:
        got = call_forward(denoiser, x, t)
    alphas = sd_model.alphas_cumprod

    def q_sample(latent, timestep, noise):
        a = alphas[int(round(float(timestep.reshape(-1)[0])))]
        return a.sqrt() * latent + (1 - a).sqrt() * noise

    plan2, hooks2 = make_plan(sd_model, rg, sg, injection=True)
    with hooks2:
        expected = reference_call(denoiser, plan2, hooks2, x, t, t, q_sample)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    a = alphas[601]
    assert torch.allclose(sampler.last_latent, (x - (1 - a).sqrt() * got) / a.sqrt(), atol=1e-5)


def test_guidance_window_closed_uses_one_zero_token(webui, sd_model):
    sampler, denoiser = make_denoiser(webui, sd_model)
    plan, hooks = make_plan(sd_model, 3.0, 1.0, window=(0.5, 1.0))
    seen = []
    handle = sd_model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["context"].shape), with_kwargs=True)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    try:
        with hooks:
            call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 14.0))  # t ~ 999: window closed
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0][1:] == (1, 32)  # one zero token for every row (the core may skip u_ref)


# ------------------------------------------------------------------------------------------ webui contract
@pytest.mark.parametrize("mode", ["both", "reference"])
def test_batch_cond_uncond_off_gives_the_same_result(webui, sd_model, mode):
    from modules import shared

    rg, sg = MODES[mode]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 2
    sigma = torch.full((2,), 1.7)
    results = {}
    for together in (True, False):
        shared.opts.batch_cond_uncond = together
        _, denoiser = make_denoiser(webui, sd_model)
        plan, hooks = make_plan(sd_model, rg, sg, injection=True)
        sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
        with hooks:
            results[together] = call_forward(denoiser, x, sigma)
        assert plan.stats["unet_calls"] == 2 * (1 if together else len(plan.roles)), "per image of the batch of 2"
    # the u_ref rows alone in a call take the separate plain attention, with them the merged one: same maths
    assert (results[True] - results[False]).abs().max() <= 1e-5 * results[True].abs().max()


@pytest.mark.parametrize("flag", ["interrupted", "skipped"])
def test_interrupt_and_skip_raise_interrupted_exception(webui, sd_model, flag):
    from modules import sd_samplers_common, shared

    _, denoiser = make_denoiser(webui, sd_model)
    plan, hooks = make_plan(sd_model, 3.0, 1.0)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    setattr(shared.state, flag, True)
    with hooks, pytest.raises(sd_samplers_common.InterruptedException):
        call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 3.0))
    assert plan.stats["unet_calls"] == 0


def test_preparation_error_is_raised_by_the_first_call(webui, sd_model):
    _, denoiser = make_denoiser(webui, sd_model)
    sampling.bind(denoiser, sampling.SamplingContext(error=ValueError("prepared badly")))
    with pytest.raises(ValueError, match="prepared badly"):
        call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 3.0))


def test_callbacks_fire_and_their_edits_count(webui, sd_model):
    from modules import script_callbacks

    events = []

    def on_denoiser(params):
        events.append(("denoiser", tuple(params.x.shape), tuple(params.text_cond.shape)))

    def on_denoised(params):
        events.append(("denoised", tuple(params.x.shape)))
        params.x.mul_(0.0)  # in place: all rows zero -> the guided result is zero

    def on_after(params):
        events.append(("after", tuple(params.x.shape)))
        params.x = params.x + 1.0  # replacement

    script_callbacks.on_cfg_denoiser(on_denoiser)
    script_callbacks.on_cfg_denoised(on_denoised)
    script_callbacks.on_cfg_after_cfg(on_after)
    for together in (True, False):
        from modules import shared

        shared.opts.batch_cond_uncond = together
        events.clear()
        _, denoiser = make_denoiser(webui, sd_model)
        plan, hooks = make_plan(sd_model, 3.0, 2.0, injection=True)
        sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
        with hooks:
            out = call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 3.0))
        assert torch.equal(out, torch.ones_like(out))
        assert events == [("denoiser", (1, 4, 8, 8), (1, 256, 32)), ("denoised", (3, 4, 8, 8)),
                          ("after", (1, 4, 8, 8))]


def test_cfg_denoised_fires_once_when_the_window_is_closed(webui, sd_model):
    """Outside the guidance window the core may evaluate fewer row groups; the callback still fires once."""
    from modules import script_callbacks, shared

    events = []
    script_callbacks.on_cfg_denoised(lambda params: events.append(tuple(params.x.shape)))
    for together in (True, False):
        shared.opts.batch_cond_uncond = together
        events.clear()
        _, denoiser = make_denoiser(webui, sd_model)
        plan, hooks = make_plan(sd_model, 3.0, 2.0, window=(0.5, 1.0))
        sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
        with hooks:
            call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 14.0))
        assert len(events) == 1 and events[0][0] in (2, 3)


def test_store_latent_and_step_counter(webui, sd_model):
    from modules import sd_samplers_common, shared

    shared.opts.live_preview_content = "Combined"

    sampler, denoiser = make_denoiser(webui, sd_model)
    plan, hooks = make_plan(sd_model, 3.0, 1.0)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    with hooks:
        for _ in range(3):
            call_forward(denoiser, torch.randn(1, 4, 8, 8), torch.full((1,), 3.0))
    assert denoiser.step == 3
    assert sd_samplers_common.stored_latents[-1] is sampler.last_latent


@pytest.mark.parametrize("sampler_name", ["Euler", "DDIM"])
def test_mask_blend_as_the_webui(webui, sd_model, sampler_name):
    """After denoising (k-diffusion) or before (timestep samplers), through the scripts' on_mask_blend."""
    from modules import scripts

    calls = []

    class Recorder(scripts.Script):
        def title(self):
            return "recorder"

        def on_mask_blend(self, p, mba, *args):
            calls.append((mba.is_final_blend, mba.sigma is not None))
            mba.blended_latent = mba.blended_latent + 0.25

    runner = scripts.ScriptRunner()
    runner.add(Recorder(), 0)
    p = webui.txt2img(None, with_script=False)
    p.scripts = runner
    sampler, denoiser = make_denoiser(webui, sd_model, sampler_name, p=p)
    mask = torch.zeros(1, 4, 8, 8)
    mask[..., :4] = 1.0
    denoiser.mask, denoiser.nmask = mask, 1.0 - mask
    denoiser.init_latent = torch.randn(1, 4, 8, 8)
    x = torch.randn(1, 4, 8, 8)
    sigma = torch.full((1,), 401.0 if sampler_name == "DDIM" else 3.0)
    plan, hooks = make_plan(sd_model, 3.0, 1.0)
    sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
    with hooks:
        got = call_forward(denoiser, x, sigma)
    plan2, hooks2 = make_plan(sd_model, 3.0, 1.0)
    blend = lambda latent: latent * denoiser.nmask + denoiser.init_latent * denoiser.mask + 0.25  # noqa: E731
    t = sigma if sampler_name == "DDIM" else denoiser.inner_model.sigma_to_t(sigma)
    with hooks2:
        if sampler_name == "DDIM":
            expected = reference_call(denoiser, plan2, hooks2, blend(x), sigma, t,
                                      sampling.make_noised_reference(denoiser))
        else:
            expected = blend(reference_call(denoiser, plan2, hooks2, x, sigma, t,
                                            sampling.make_noised_reference(denoiser)))
    assert torch.allclose(got, expected, atol=1e-6)
    assert calls == [(False, True)]


def test_bind_is_per_instance_and_removable(webui, sd_model):
    from modules import sd_samplers_cfg_denoiser

    _, a = make_denoiser(webui, sd_model)
    _, b = make_denoiser(webui, sd_model)
    sampling.bind(a, sampling.SamplingContext())
    assert sampling.is_bound(a) and not sampling.is_bound(b)
    assert type(a).forward is not sampling.colorize_forward
    assert "forward" not in vars(sd_samplers_cfg_denoiser.CFGDenoiser) or \
        sd_samplers_cfg_denoiser.CFGDenoiser.forward is not sampling.colorize_forward
    sampling.unbind(a)
    assert not sampling.is_bound(a)


# ------------------------------------------------------------------------- the whole run: webui == host-free
class HostFreeUNet(torch.nn.Module):
    """The stand-in webui's ldm U-Net as the host-free pipeline takes one (``unet(x, t, context)``,
    ``config.context_dim``), so that both runs share the U-Net and its patched attention kernel."""

    def __init__(self, ldm_unet, context_dim: int):
        super().__init__()
        self.ldm_unet = ldm_unet
        self.input_blocks = ldm_unet.input_blocks
        self.config = types.SimpleNamespace(context_dim=context_dim)

    def forward(self, x, timesteps, context=None):
        return self.ldm_unet(x, timesteps, context=context)


@pytest.mark.parametrize("sampler_name,batch,injection,mode", [
    ("Euler", 1, False, "both"),
    ("Euler", 2, True, "reference"),
    ("DPM++ 2M", 1, True, "both"),
    ("Euler", 1, False, "sketch"),
    ("Euler a", 2, False, "both"),
])
def test_webui_and_host_free_pipeline_give_the_same_latents(webui, sd_model, checkpoint_file, sampler_name, batch,
                                                            injection, mode):
    """The webui's run (k-diffusion's sampler, ``CompVisDenoiser`` and schedule, the webui's noise) and the
    host-free pipeline (``lib_colorize``'s samplers, schedule and noise) give the same latents."""
    import cd_webui.model as cd_model
    from lib_colorize.checkpoint import inspect_checkpoint
    from lib_colorize.models.clip import ClipEncoders
    from lib_colorize.pipeline import Colorizer, SamplingOptions
    from lib_colorize.schedule import NoiseSchedule

    rg, sg = MODES[mode]
    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image(),
               "reference_guidance": rg, "sketch_guidance": sg, "sketch_strength": 0.9, "injection": injection,
               "injection_sketch_fidelity": 0.5, "reference_strength": 0.8, "pad_reference": 1.2}
    p = webui.txt2img(options, sampler_name=sampler_name, steps=3, seed=4321, batch_size=batch, width=64,
                      height=64)
    webui.run(p)
    from modules import errors

    assert errors.reported == []
    webui_latents = p.all_samples[0]

    checkpoint = types.SimpleNamespace(unet=HostFreeUNet(sd_model.model.diffusion_model, CONTEXT_DIM),
                                       vae=sd_model.first_stage_model,
                                       sketch_encoder=cd_model.sketch_encoder(sd_model),
                                       info=inspect_checkpoint(checkpoint_file))
    clip = ClipEncoders(reference=cd_model.reference_encoder(), text=None, weights_path="", arch="tiny")
    colorizer = Colorizer(checkpoint, clip)
    colorizer.schedule = NoiseSchedule(sd_model.alphas_cumprod)
    result = colorizer.colorize(ColorizeOptions.from_dict(options),
                                SamplingOptions(sampler=sampler_name, steps=3, seed=4321, width=64, height=64,
                                                batch_size=batch))
    assert result.latents.shape == webui_latents.shape
    assert torch.allclose(result.latents, webui_latents, atol=5e-6, rtol=0), \
        (result.latents - webui_latents).abs().max()
    assert live_count() == 0


# ------------------------------------------------------------------------------ reference noise, live preview
@pytest.mark.parametrize("sigma_value", [2.5, 0.7, 11.0])
def test_reference_is_noised_at_the_rounded_timestep_like_the_original(webui, sd_model, sigma_value):
    """Method §6.2: the reference pass sees q(r, round(t)); k-diffusion's continuous sigma alone gives q(r, t)."""
    _, denoiser = make_denoiser(webui, sd_model)
    sigma = torch.full((1,), sigma_value)
    t = float(denoiser.inner_model.sigma_to_t(sigma))
    assert abs(t - round(t)) > 0.01, "the test needs a fractional timestep"
    generator = torch.Generator().manual_seed(3)
    latent, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    got = sampling.make_noised_reference(denoiser)(latent, sigma, noise)
    want = original_noised_reference(latent, sigma, noise)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    continuous = latent + sigma_value * noise
    assert not torch.allclose(continuous, want, rtol=1e-5, atol=1e-6), "round(t) must make a difference here"


def test_live_preview_follows_live_preview_content(webui, sd_model):
    """The webui's setting: "Prompt" previews the full-condition rows, "Negative prompt" the unconditional rows
    (reference dropped), "Combined" the guided result."""
    from modules import sd_samplers_common, shared

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3.0
    sigma = torch.full((1,), 3.0)
    previews, last = {}, {}
    for content in ("Prompt", "Negative prompt", "Combined"):
        shared.opts.live_preview_content = content
        sampler, denoiser = make_denoiser(webui, sd_model)
        plan, hooks = make_plan(sd_model, 3.0, 1.0)           # reference guidance 3: rows [c | u_ref]
        sampling.bind(denoiser, sampling.SamplingContext(plan=plan, processors=hooks))
        with hooks:
            torch.manual_seed(0)
            call_forward(denoiser, x, sigma)
        previews[content], last[content] = sd_samplers_common.stored_latents[-1], sampler.last_latent
    assert torch.equal(last["Prompt"], last["Combined"]) and torch.equal(last["Prompt"], last["Negative prompt"])
    assert torch.equal(previews["Combined"], last["Combined"])
    prompt, negative = previews["Prompt"], previews["Negative prompt"]
    assert not torch.allclose(prompt, previews["Combined"]) and not torch.allclose(negative, prompt)
    assert torch.allclose(previews["Combined"], negative + 3.0 * (prompt - negative), atol=1e-5)
