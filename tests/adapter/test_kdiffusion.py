"""``lib_colorize``'s schedule, denoiser wrapper and samplers against k-diffusion, the code the webui samples with.

k-diffusion is PyPI's 0.1.1.post1, whose ``sampling.py`` and ``external.py`` are the files of the commit the webui
v1.10.1 pins (``tests/adapter/stand_in/k_diffusion`` lists the differences of the release; with ``CD_WEBUI_DIR`` set,
``test_stand_in.py`` checks the identity against the webui's own checkout). Every comparison runs both on the same
inputs: the SD schedule, a denoiser with a closed form, and the same noise for the stochastic samplers.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import k_diffusion.external
import k_diffusion.sampling
import pytest
import torch

from lib_colorize import samplers as ours
from lib_colorize.schedule import NoiseSchedule, make_denoiser

MU, STD = 0.3, 0.5


class _ScheduleModel(torch.nn.Module):
    """What ``CompVisDenoiser`` needs of an ldm model: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, alphas_cumprod, parameterization="eps"):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.parameterization = parameterization

    def apply_model(self, x, t, cond):
        # an eps/v "network" that depends on x, t and the conditioning, so every scaling shows
        return torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1) / 500.0) + cond


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.scaled_linear()


@pytest.fixture(scope="module")
def kd_eps(schedule):
    return k_diffusion.external.CompVisDenoiser(_ScheduleModel(schedule.alphas_cumprod.clone()))


def gaussian_denoiser(x, sigma, **kwargs):
    """The exact denoiser of N(MU, STD^2) data."""
    sig2 = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) ** 2
    return (STD ** 2 * x + sig2 * MU) / (STD ** 2 + sig2)


def test_k_diffusion_is_the_pypi_release_without_its_package_init():
    distribution = importlib.metadata.distribution("k-diffusion")
    assert distribution.version == "0.1.1.post1"
    installed = Path(str(distribution.locate_file("k_diffusion"))).resolve()
    for module in (k_diffusion.sampling, k_diffusion.external, k_diffusion.utils):
        assert Path(module.__file__).resolve().parent == installed
    assert not hasattr(k_diffusion, "evaluation") and not hasattr(k_diffusion, "Denoiser")


def test_schedule_equals_discrete_schedule(schedule, kd_eps):
    assert torch.equal(schedule.sigmas, kd_eps.sigmas)
    assert torch.equal(schedule.log_sigmas, kd_eps.log_sigmas)
    sigmas = torch.cat([torch.logspace(-2, 1.3, 97), schedule.sigmas[[0, 1, 500, 998, 999]]])
    assert torch.allclose(schedule.sigma_to_t(sigmas), kd_eps.sigma_to_t(sigmas), atol=1e-4, rtol=0)
    assert torch.equal(schedule.sigma_to_t(sigmas, quantize=True), kd_eps.sigma_to_t(sigmas, quantize=True).float())
    t = torch.cat([torch.linspace(0, 999, 301), torch.tensor([0.25, 998.5])])
    assert torch.allclose(schedule.t_to_sigma(t), kd_eps.t_to_sigma(t), rtol=1e-6, atol=0)
    for n in (1, 3, 20, 37):
        assert torch.allclose(schedule.get_sigmas(n, "uniform"), kd_eps.get_sigmas(n), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,function", [("karras", "get_sigmas_karras"), ("exponential", "get_sigmas_exponential")])
def test_sigma_schedules_equal_k_diffusion(schedule, kd_eps, kind, function):
    for n in (1, 4, 25):
        theirs = getattr(k_diffusion.sampling, function)(n, kd_eps.sigmas[0].item(), kd_eps.sigmas[-1].item())
        assert torch.allclose(schedule.get_sigmas(n, kind), theirs, rtol=1e-5, atol=0), (kind, n)


@pytest.mark.parametrize("parameterization,wrapper", [("eps", "CompVisDenoiser"), ("v", "CompVisVDenoiser")])
@pytest.mark.parametrize("quantize", [False, True])
def test_denoiser_equals_compvis_denoiser(schedule, parameterization, wrapper, quantize):
    model = _ScheduleModel(schedule.alphas_cumprod.clone(), parameterization)
    theirs = getattr(k_diffusion.external, wrapper)(model, quantize=quantize)
    mine = make_denoiser(lambda x_in, t, cond: model.apply_model(x_in, t, cond), parameterization, schedule,
                         quantize=quantize)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    sigma = torch.tensor([0.05, 1.3, 14.0])
    cond = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mine(x, sigma, cond=cond), theirs(x, sigma, cond=cond), atol=1e-5, rtol=1e-5)


def _fixed_noise(shape, draws, seed=7):
    """A noise sampler handing out the same precomputed draws to whichever sampler asks."""
    table = torch.randn((draws,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    used = []

    def sampler(sigma, sigma_next):
        used.append(float(sigma))
        return table[len(used) - 1]

    return sampler


#: lib_colorize sampler, schedule it is run on, whether it draws noise (DPM++ SDE: two draws per step).
SAMPLER_CASES = [
    ("sample_euler", "uniform", False),
    ("sample_euler_ancestral", "uniform", True),
    ("sample_heun", "uniform", False),
    ("sample_dpm_2", "karras", False),
    ("sample_dpm_2_ancestral", "karras", True),
    ("sample_lms", "uniform", False),
    ("sample_dpmpp_2m", "karras", False),
    ("sample_dpmpp_sde", "karras", True),
    ("sample_dpmpp_2m_sde", "exponential", True),
    ("sample_dpmpp_3m_sde", "exponential", True),
]


@pytest.mark.parametrize("name,kind,stochastic", SAMPLER_CASES)
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_samplers_equal_k_diffusion(schedule, name, kind, stochastic, steps):
    """Every step: the same denoiser, sigmas and noise draws give k-diffusion's latent (a three-step history
    for 3M SDE, four slopes for LMS, and two calls per step for the second-order ones are all exercised at 9)."""
    sigmas = schedule.get_sigmas(steps, kind)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(steps)) * sigmas[0]
    kwargs_ours, kwargs_theirs = {}, {}
    if stochastic:
        kwargs_ours["noise_sampler"] = _fixed_noise(x.shape, 2 * steps)
        kwargs_theirs["noise_sampler"] = _fixed_noise(x.shape, 2 * steps)
    mine = getattr(ours, name)(gaussian_denoiser, x.clone(), sigmas, **kwargs_ours)
    if name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde") and steps == 1:
        # k-diffusion (the pinned commit as PyPI) reads h_last / h of a step to sigma 0 that never set h: one step
        # of DPM++ 2M SDE or 3M SDE fails in the webui itself; ours returns the denoised latent of that single step
        with pytest.raises(UnboundLocalError):
            getattr(k_diffusion.sampling, name)(gaussian_denoiser, x.clone(), sigmas, disable=True, **kwargs_theirs)
        assert torch.allclose(mine, gaussian_denoiser(x, sigmas[:1]))
        return
    theirs = getattr(k_diffusion.sampling, name)(gaussian_denoiser, x.clone(), sigmas, disable=True,
                                                 **kwargs_theirs)
    assert torch.allclose(mine, theirs, atol=2e-5, rtol=1e-5), (mine - theirs).abs().max()


@pytest.mark.parametrize("name,kind", [("sample_heun", "karras"), ("sample_dpm_2", "karras"),
                                       ("sample_dpm_2_ancestral", "karras"), ("sample_lms", "karras"),
                                       ("sample_dpmpp_3m_sde", "exponential")])
def test_samplers_step_for_step_with_k_diffusion(schedule, name, kind):
    """After each step the latent and the denoised the callback sees are k-diffusion's, on a denoiser that is not
    linear in x (every step's formula shows), for the webui's sigmas of the sampler (DPM2, DPM2 a, 3M SDE drop
    the next-to-last sigma)."""
    steps = 7
    sigmas = ours.discard_penultimate_sigma(schedule.get_sigmas(steps + 1, kind))

    def denoiser(x, sigma, **kwargs):
        return gaussian_denoiser(x, sigma) + 0.05 * torch.sin(3 * x) / (1 + sigma.view(-1, 1, 1, 1))

    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    kwargs = {"noise_sampler": _fixed_noise(x.shape, steps)} if name.endswith(("ancestral", "sde")) else {}
    mine = []
    getattr(ours, name)(denoiser, x.clone(), sigmas, callback=lambda i, n, xi, d: mine.append((xi, d)), **kwargs)
    theirs = []
    kwargs = {"noise_sampler": _fixed_noise(x.shape, steps)} if kwargs else {}
    getattr(k_diffusion.sampling, name)(denoiser, x.clone(), sigmas, disable=True,
                                        callback=lambda info: theirs.append((info["x"], info["denoised"])), **kwargs)
    # k-diffusion's callback sees the latent before the step, ours after it: compare step i's denoised and the
    # latent after step i with k-diffusion's before step i + 1
    assert len(mine) == len(theirs) == steps
    for i in range(steps):
        assert torch.allclose(mine[i][1], theirs[i][1], atol=1e-5, rtol=1e-5), (name, i)
        if i + 1 < steps:
            assert torch.allclose(mine[i][0], theirs[i + 1][0], atol=1e-5, rtol=1e-5), (name, i)


@pytest.mark.parametrize("kind", ["karras", "uniform"])
def test_lms_weights_equal_k_diffusion(kind):
    """Our exact integral of the Lagrange basis against k-diffusion's ``scipy.integrate.quad`` of it. k-diffusion
    forms the node differences ``t_{i-j} - t_{i-k}`` of its float32 sigmas in float32 (numpy float32 scalars), we
    in float64: the weights differ by up to 7.5e-8 relative, float32 rounding."""
    sigmas = NoiseSchedule.scaled_linear().get_sigmas(30, kind).numpy()
    for i in range(30):
        for order in range(1, min(i + 1, 4) + 1):
            for j in range(order):
                assert ours.linear_multistep_coeff(order, sigmas, i, j) == pytest.approx(
                    k_diffusion.sampling.linear_multistep_coeff(order, sigmas, i, j), rel=2e-7, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Should have t")   # k-diffusion's trees: queries rounded past their interval
@pytest.mark.parametrize("name,kind,options", [
    ("sample_dpmpp_2m_sde", "exponential", {"solver_type": "heun"}),
    ("sample_dpmpp_2m_sde", "exponential", {}),
    ("sample_dpmpp_sde", "karras", {}),
    ("sample_dpmpp_3m_sde", "exponential", {}),
])
def test_sde_samplers_with_the_webuis_brownian_noise_equal_k_diffusion(schedule, name, kind, options):
    """The webui's SDE samplers: k-diffusion's ``BrownianTreeNoiseSampler`` seeded with the image seeds, as the
    webui's ``create_noise_sampler`` builds it, against ours from ``brownian_tree_noise_sampler`` with the same
    seeds: the noise is the same bit for bit, and so is each sampler's result within float tolerance."""
    sigmas = schedule.get_sigmas(6, kind)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)) * sigmas[0]

    def webuis():
        return k_diffusion.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                             seed=[11, 12])

    theirs_noise, mine_noise = webuis(), ours.brownian_tree_noise_sampler(x, sigmas, [11, 12])
    for a, b in ((0, 1), (1, 2), (2, 5), (5, 3)):
        assert torch.equal(mine_noise(sigmas[a], sigmas[b]), theirs_noise(sigmas[a], sigmas[b])), (a, b)
    theirs = getattr(k_diffusion.sampling, name)(gaussian_denoiser, x.clone(), sigmas, disable=True,
                                                 noise_sampler=webuis(), **options)
    mine = getattr(ours, name)(gaussian_denoiser, x.clone(), sigmas,
                               noise_sampler=ours.brownian_tree_noise_sampler(x, sigmas, [11, 12]), **options)
    assert torch.allclose(mine, theirs, atol=2e-5, rtol=1e-5), (mine - theirs).abs().max()
    assert not torch.allclose(mine, getattr(ours, name)(gaussian_denoiser, x.clone(), sigmas, eta=0.0, **options),
                              atol=1e-3), "the Brownian noise must matter"


def test_polyexponential_equals_k_diffusion(schedule, kd_eps):
    smin, smax = kd_eps.sigmas[0].item(), kd_eps.sigmas[-1].item()
    for n in (1, 4, 25):
        for rho in (1.0, 2.0):
            theirs = k_diffusion.sampling.get_sigmas_polyexponential(n, smin, smax, rho=rho)
            assert torch.allclose(schedule.get_sigmas_polyexponential(n, rho), theirs, rtol=1e-6, atol=0), (n, rho)
