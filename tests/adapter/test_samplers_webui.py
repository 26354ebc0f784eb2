"""``lib_colorize``'s sampler registry, sigma schedules and Brownian-tree noise against the webui's.

Always: the registry (:data:`lib_colorize.samplers.SAMPLERS`) against the stand-in's ``samplers_k_diffusion``
table and the sigmas of each sampler and schedule against the stand-in's ``KDiffusionSampler.get_sigmas``; both
are the webui's (``test_stand_in.py`` compares them with the real table and the real ``get_sigmas`` when
``CD_WEBUI_DIR`` is set). With ``CD_WEBUI_DIR``: every "Schedule type" against the real ``modules/sd_schedulers.py``,
and our Brownian noise against the real ``Sampler.create_noise_sampler``, compiled from the webui's source.
"""
from __future__ import annotations

import types

import k_diffusion.external
import pytest
import torch

from conftest import load_real_webui_module, real_webui_functions
from lib_colorize import samplers as ours
from lib_colorize.schedule import NoiseSchedule


def test_registry_is_the_webuis_sampler_table():
    """Each of our samplers is the webui's row of the same name: the k-diffusion function, the "Automatic"
    schedule, Brownian noise for the SDE samplers, per-image generator noise for the ancestral ones (the rows that
    use the eta noise seed delta), the dropped next-to-last sigma, the second-order flag and the solver type."""
    from modules import sd_samplers_kdiffusion

    table = {label: (funcname, options) for label, funcname, _, options in sd_samplers_kdiffusion.samplers_k_diffusion}
    assert set(ours.SAMPLERS) - set(table) == {"DDIM"}, "every k-diffusion sampler of ours is in the webui's table"
    for label, info in ours.SAMPLERS.items():
        if label == "DDIM":
            continue
        funcname, options = table[label]
        noise = ("brownian" if options.get("brownian_noise") else "generator" if options.get("uses_ensd")
                 else "none")
        assert (info.func.__name__, info.schedule, info.noise, info.discard_penultimate_sigma, info.second_order,
                dict(info.options)) == (
            funcname, options.get("scheduler", "automatic"), noise, options.get("discard_next_to_last_sigma", False),
            options.get("second_order", False), {"solver_type": options["solver_type"]} if "solver_type" in options
            else {}), label


def test_sigmas_are_the_webuis(webui, sd_model):
    """``SamplerInfo.sigmas`` for every sampler and every schedule the stand-in has, "Automatic" included."""
    from modules import sd_samplers, sd_schedulers

    schedule = NoiseSchedule(sd_model.alphas_cumprod.detach().float().cpu())
    for label, *_ in __import__("modules.sd_samplers_kdiffusion").sd_samplers_kdiffusion.samplers_k_diffusion:
        sampler = sd_samplers.create_sampler(label, sd_model)
        for scheduler in sd_schedulers.schedulers:
            p = webui.txt2img(None, with_script=False, sampler_name=label)
            p.is_hr_pass, p.sampler_noise_scheduler_override = False, None
            p.scheduler = scheduler.label
            for steps in (1, 2, 7):
                theirs = sampler.get_sigmas(p, steps)
                mine = ours.get_sampler(label, scheduler.label).sigmas(schedule, steps)
                assert mine.shape == theirs.shape, (label, scheduler.label, steps)
                assert torch.allclose(mine, theirs, rtol=1e-5, atol=0), (label, scheduler.label, steps)


class _ScheduleModel(torch.nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)


def test_every_schedule_is_the_webuis(webui, monkeypatch):
    """Each "Schedule type" of the real ``modules/sd_schedulers.py`` (run over k-diffusion's ``CompVisDenoiser``,
    with the webui's default Beta parameters and an SD 1.5-family model) gives our sigmas."""
    from modules import shared

    real = load_real_webui_module("modules/sd_schedulers.py", "webui_real_sd_schedulers_for_samplers")
    monkeypatch.setattr(shared, "sd_model", types.SimpleNamespace(is_sdxl=False), raising=False)
    shared.opts.beta_dist_alpha = shared.opts.beta_dist_beta = 0.6
    schedule = NoiseSchedule.scaled_linear()
    inner_model = k_diffusion.external.CompVisDenoiser(_ScheduleModel(schedule.alphas_cumprod.clone()))
    sigma_min, sigma_max = inner_model.sigmas[0].item(), inner_model.sigmas[-1].item()
    labels = [s.label for s in real.schedulers]
    assert tuple(labels) == ours.SCHEDULES
    for scheduler in real.schedulers:
        if scheduler.function is None:
            continue
        assert ours.get_sampler("Euler", scheduler.label).schedule == scheduler.name
        for n in (1, 3, 10, 11, 20):
            kwargs = {"n": n, "sigma_min": sigma_min, "sigma_max": sigma_max, "device": "cpu"}
            if scheduler.need_inner_model:
                kwargs["inner_model"] = inner_model
            theirs = scheduler.function(**kwargs)
            mine = schedule.get_sigmas(n, scheduler.label)
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, (scheduler.label, n)
            assert torch.allclose(mine, theirs, rtol=2e-6, atol=0), (scheduler.label, n, mine, theirs)


@pytest.mark.filterwarnings("ignore:Should have t")
def test_brownian_noise_is_the_webuis_create_noise_sampler(webui):
    """The real ``Sampler.create_noise_sampler``, for a batch of two with seeds 1234 and 1235 and the webui's
    default options, draws what ``brownian_tree_noise_sampler(x, sigmas, [1234, 1235])`` draws, bit for bit."""
    from modules import shared

    real = real_webui_functions("modules/sd_samplers_common.py", ["Sampler.create_noise_sampler"],
                                {"shared": shared})["Sampler.create_noise_sampler"]
    sigmas = ours.get_sampler("DPM++ 3M SDE").sigmas(NoiseSchedule.scaled_linear(), 6)
    x = torch.zeros(2, 4, 8, 8)
    p = types.SimpleNamespace(all_seeds=[1234, 1235, 1236, 1237], iteration=0, batch_size=2)
    theirs = real(None, x, sigmas, p)
    mine = ours.brownian_tree_noise_sampler(x, sigmas, [1234, 1235])
    for i in range(len(sigmas) - 2):
        assert torch.equal(mine(sigmas[i], sigmas[i + 1]), theirs(sigmas[i], sigmas[i + 1])), i
    p.iteration = 1                        # the second batch of a run: seeds 1236, 1237
    second = ours.brownian_tree_noise_sampler(x, sigmas, [1236, 1237])
    assert torch.equal(second(sigmas[0], sigmas[1]), real(None, x, sigmas, p)(sigmas[0], sigmas[1]))
