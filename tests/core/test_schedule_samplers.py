"""Schedule constants, sigma <-> t, sigma schedules, denoiser wrappers and samplers.

Method §1.1, §9, §10.3 item 1, §11.

Samplers are checked on the exact denoiser of Gaussian data N(mu, s^2):
``D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``, whose probability-flow ODE has the closed-form solution
``x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)``.
"""
import math

import pytest
import torch

from lib_colorize import samplers as S
from lib_colorize import schedule as sch
from lib_colorize.schedule import NoiseSchedule, default_schedule

MU, STD = 0.3, 0.5


def gaussian_denoiser(mu=MU, s=STD, calls=None):
    def D(x, sigma, **kwargs):
        if calls is not None:
            calls.append((sigma.clone(), kwargs))
        sig2 = sch.append_dims(sigma.to(x.dtype), x.ndim) ** 2
        return (s ** 2 * x + sig2 * mu) / (s ** 2 + sig2)
    return D


def exact_ode(x_T, sigma_T, sigma=0.0, mu=MU, s=STD):
    return mu + (x_T - mu) * math.sqrt(s ** 2 + sigma ** 2) / math.sqrt(s ** 2 + sigma_T ** 2)


@pytest.fixture(scope="module")
def sched():
    return default_schedule()


# ------------------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------------------

def test_schedule_constants(sched):
    assert sched.num_timesteps == 1000
    assert sched.sigmas.dtype == torch.float32 and sched.alphas_cumprod.dtype == torch.float32
    assert sched.sigma_min == pytest.approx(0.0291675, rel=1e-5)
    assert sched.sigma_max == pytest.approx(14.614642, rel=1e-5)
    assert float(sched.alphas_cumprod[999]) == pytest.approx(0.0046601, rel=1e-5)
    assert float(sched.sigmas[0]) == sched.sigma_min and float(sched.sigmas[-1]) == sched.sigma_max
    betas = sch.scaled_linear_betas()
    i = torch.arange(1000, dtype=torch.float64)
    expected = (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=0)
    assert torch.all(sched.sigmas[1:] > sched.sigmas[:-1])


def test_sigma_t_round_trip_integer(sched):
    t = torch.arange(1000, dtype=torch.float32)
    sig = sched.t_to_sigma(t)
    torch.testing.assert_close(sig, sched.sigmas, rtol=1e-6, atol=0)  # exp(log sigma_t), as k-diffusion
    assert torch.equal(sched.sigma_to_t(sched.sigmas), t)
    assert torch.equal(sched.sigma_to_t(sched.sigmas, quantize=True), t)


def test_sigma_t_round_trip_fractional(sched):
    t = torch.tensor([0.25, 0.5, 17.3, 500.7, 998.01, 998.99])
    sig = sched.t_to_sigma(t)
    # log-linear interpolation between neighbours
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    expected = ((1 - w) * sched.log_sigmas[lo] + w * sched.log_sigmas[hi]).exp()
    torch.testing.assert_close(sig, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.sigma_to_t(sig), t, rtol=0, atol=2e-3)
    # outside the table: clamped, shape kept
    out = sched.sigma_to_t(torch.tensor([[1e-4, 100.0]]))
    assert out.shape == (1, 2) and out.tolist() == [[0.0, 999.0]]
    # sigma -> t -> sigma for arbitrary sigmas inside the range
    sig2 = torch.tensor([0.05, 0.7, 3.3, 14.0])
    torch.testing.assert_close(sched.t_to_sigma(sched.sigma_to_t(sig2)), sig2, rtol=1e-5, atol=0)


def test_sigma_schedules(sched):
    n = 10
    uni = sched.get_sigmas(n, "Automatic")
    assert torch.equal(uni, sched.get_sigmas(n, "uniform"))
    assert uni.shape == (n + 1,) and uni[-1] == 0
    torch.testing.assert_close(uni[:-1], sched.t_to_sigma(torch.linspace(999, 0, n)))
    assert uni[0] == pytest.approx(sched.sigma_max) and uni[-2] == pytest.approx(sched.sigma_min)

    kar = sched.get_sigmas(n, "Karras")
    rho = 7.0
    i = torch.arange(n, dtype=torch.float64)
    smin, smax = sched.sigma_min, sched.sigma_max
    expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(kar[:-1].double(), expected, rtol=1e-5, atol=0)
    assert kar[-1] == 0 and kar.shape == (n + 1,)

    exp_ = sched.get_sigmas(n, "Exponential")
    expected = torch.exp(math.log(smax) + i / (n - 1) * (math.log(smin) - math.log(smax)))
    torch.testing.assert_close(exp_[:-1].double(), expected, rtol=1e-5, atol=0)
    assert exp_[-1] == 0

    for sig in (uni, kar, exp_):
        assert torch.all(sig[1:] < sig[:-1])
    assert sched.get_sigmas(1, "karras").tolist() == [pytest.approx(smax), 0.0]
    with pytest.raises(ValueError):
        sched.get_sigmas(10, "polyexponential")
    with pytest.raises(ValueError):
        sched.get_sigmas(0, "karras")


def test_ddim_schedule(sched):
    ts = sch.ddim_timesteps(20)
    assert ts.tolist() == list(range(1, 1000, 50))
    sig = sched.get_sigmas(20, "ddim")
    assert sig.shape == (21,) and sig[-1] == 0
    assert torch.equal(sig[:-1], sched.sigmas[ts.flip(0)])
    assert torch.equal(sched.sigma_to_t(sig[:-1]), ts.flip(0).float())
    # like ldm / webui: 1000 // 30 = 33 -> 31 timesteps
    assert sch.ddim_timesteps(30).tolist() == [k * 33 + 1 for k in range(31)]
    assert sch.ddim_timesteps(1000).max() == 999 and len(sch.ddim_timesteps(1000)) == 999


# ------------------------------------------------------------------------------------------------------------
# Parameterizations and denoiser wrappers
# ------------------------------------------------------------------------------------------------------------

def test_eps_v_to_x0_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.03, 1.0, 14.6], dtype=torch.float64)
    sig = sigma.view(-1, 1, 1, 1)
    x = x0 + sig * eps
    torch.testing.assert_close(sch.eps_to_x0(x, sigma, eps), x0)
    torch.testing.assert_close(sch.x0_to_eps(x, sigma, x0), eps)
    # v = sqrt(a) eps - sqrt(1-a) x0 with a = 1/(sigma^2+1)
    sqrt_a, sqrt_1ma = 1 / (sig ** 2 + 1).sqrt(), sig / (sig ** 2 + 1).sqrt()
    v = sqrt_a * eps - sqrt_1ma * x0
    torch.testing.assert_close(sch.v_to_x0(x, sigma, v), x0)
    # VP form: x0 = sqrt(a) x_vp - sqrt(1-a) v
    torch.testing.assert_close(sch.v_to_x0(x, sigma, v), sqrt_a * (x * sqrt_a) - sqrt_1ma * v)
    # scalar sigma
    torch.testing.assert_close(sch.eps_to_x0(x[:1], 1.0, eps[:1]), x[:1] - eps[:1])
    c_skip, c_out, c_in = sch.get_scalings(torch.tensor(2.0), "v")
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((0.2, -2 / math.sqrt(5), 1 / math.sqrt(5)))


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_make_denoiser_matches_exact(sched, parameterization):
    """A raw model fn returning the exact eps / v of Gaussian data from (x_in, t) gives the exact x0."""
    seen = []

    def model_fn(x_in, t, **kwargs):
        seen.append((t.clone(), kwargs))
        sigma = sch.append_dims(sched.t_to_sigma(t), x_in.ndim).double()
        x = x_in * (sigma ** 2 + 1).sqrt()                         # undo c_in
        x0 = (STD ** 2 * x + sigma ** 2 * MU) / (STD ** 2 + sigma ** 2)
        eps = (x - x0) / sigma
        if parameterization == "eps":
            return eps
        return eps / (sigma ** 2 + 1).sqrt() - x0 * sigma / (sigma ** 2 + 1).sqrt()

    D = sch.make_denoiser(model_fn, parameterization, sched)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    sigma = torch.tensor([0.5, 7.25])
    out = D(x, sigma, cond="c")
    torch.testing.assert_close(out, gaussian_denoiser()(x, sigma.double()), rtol=1e-5, atol=1e-5)
    t, kwargs = seen[-1]
    assert kwargs == {"cond": "c"} and t.shape == (2,) and t.dtype == torch.float32
    torch.testing.assert_close(t, sched.sigma_to_t(sigma))
    # scalar sigma broadcasts to the batch
    D(x, 1.5)
    assert seen[-1][0].shape == (2,)
    with pytest.raises(ValueError):
        sch.make_denoiser(model_fn, "x0")


# ------------------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------------------

def _x_T(sched, n=64, seed=3):
    return S.initial_noise((n, 1, 1, 1), seed, sched.sigma_max, dtype=torch.float64)


def _ref_before_last_step(x_T, sigmas):
    """Exact ODE solution at sigmas[-2], then denoised: the steps to sigma 0 of all samplers return D there."""
    s_last = float(sigmas[-2])
    x = exact_ode(x_T, float(sigmas[0]), s_last)
    return gaussian_denoiser()(x, torch.full((x_T.shape[0],), s_last, dtype=x_T.dtype))


def _max_err(sampler, x_T, sigmas):
    return (sampler(gaussian_denoiser(), x_T, sigmas) - _ref_before_last_step(x_T, sigmas)).abs().max().item()


@pytest.mark.parametrize("sampler,kind,tol", [
    (S.sample_euler, "karras", 2e-2), (S.sample_euler, "uniform", 2e-2), (S.sample_euler, "exponential", 2e-2),
    (S.sample_ddim, "ddim", 2e-2), (S.sample_dpmpp_2m, "karras", 1e-3), (S.sample_dpmpp_2m, "exponential", 1e-3),
    (S.sample_dpmpp_2m, "uniform", 1e-2)])
def test_deterministic_samplers_solve_ode(sched, sampler, kind, tol):
    """200 steps from x_T = sigma_max * z land on the exact solution (outputs span ~2 units)."""
    x_T = _x_T(sched)
    sigmas = sched.get_sigmas(200, kind)
    out = sampler(gaussian_denoiser(), x_T, sigmas)
    err = (out - _ref_before_last_step(x_T, sigmas)).abs().max().item()
    assert err < tol, err
    # ... which is x_T scaled to the data distribution
    torch.testing.assert_close(out, exact_ode(x_T, float(sigmas[0])), rtol=0, atol=tol + 5e-3)


def test_dpmpp_2m_more_accurate_than_euler(sched):
    x_T = _x_T(sched)
    for n in (8, 15, 30):
        sigmas = sched.get_sigmas(n, "karras")
        err_euler, err_dpm = _max_err(S.sample_euler, x_T, sigmas), _max_err(S.sample_dpmpp_2m, x_T, sigmas)
        assert err_dpm < 0.5 * err_euler, (n, err_dpm, err_euler)


def test_convergence_orders(sched):
    """Doubling the steps halves Euler's error (order 1) and quarters DPM++ 2M's (order 2)."""
    x_T = _x_T(sched)
    s50, s100 = sched.get_sigmas(50, "karras"), sched.get_sigmas(100, "karras")
    ratio_euler = _max_err(S.sample_euler, x_T, s50) / _max_err(S.sample_euler, x_T, s100)
    ratio_dpm = _max_err(S.sample_dpmpp_2m, x_T, s50) / _max_err(S.sample_dpmpp_2m, x_T, s100)
    assert 1.7 < ratio_euler < 2.3, ratio_euler
    assert 3.3 < ratio_dpm < 5.0, ratio_dpm


def test_ddim_equals_direct_vp_ddim(sched):
    """sample_ddim on the 'ddim' sigmas == x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps on the VP latent."""
    n = 20
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * sched.sigma_max
    D = gaussian_denoiser(mu=-0.2, s=0.8)
    sigmas = sched.get_sigmas(n, "ddim")
    ours = S.sample_ddim(D, x_T, sigmas)

    ts = sch.ddim_timesteps(n).flip(0)
    ac = sched.alphas_cumprod.double()
    a = ac[ts[0]]
    x_vp = x_T * a.sqrt()                          # the same starting point in VP space
    for k, t in enumerate(ts.tolist()):
        a_t = ac[t]
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        sigma_t = torch.full((x_T.shape[0],), float(sched.sigmas[t]), dtype=torch.float64)
        x0 = D(x_vp / a_t.sqrt(), sigma_t)
        eps = (x_vp - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x_vp = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert (ours - x_vp).abs().max().item() <= 1e-5
    # and DDIM is Euler in sigma space
    torch.testing.assert_close(S.sample_euler(D, x_T, sigmas), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", [S.sample_euler_ancestral, S.sample_dpmpp_2m_sde])
def test_stochastic_samplers_reproducible(sched, sampler):
    sigmas = sched.get_sigmas(12, "karras")
    x_T = S.initial_noise((2, 4, 4, 4), 7, sched.sigma_max)
    D = gaussian_denoiser()
    a = sampler(D, x_T, sigmas, generator=torch.Generator().manual_seed(1))
    b = sampler(D, x_T, sigmas, generator=torch.Generator().manual_seed(1))
    c = sampler(D, x_T, sigmas, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # per-row generators: a row does not depend on the batch it is in
    both = sampler(D, x_T, sigmas, generator=S.seeded_generators(100, 2))
    second = sampler(D, x_T[1:], sigmas, generator=S.seeded_generators(101, 1))
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-6)
    # an injected noise sampler replaces the generator
    zeros = sampler(D, x_T, sigmas, noise_sampler=lambda s, sn: torch.zeros_like(x_T))
    zeros2 = sampler(D, x_T, sigmas, noise_sampler=lambda s, sn: torch.zeros_like(x_T),
                     generator=torch.Generator().manual_seed(9))
    assert torch.equal(zeros, zeros2)


def test_euler_ancestral_matches_exact_moments(sched):
    """On Gaussian data every Euler a step is affine in x - mu plus fresh noise, so the output mean and variance
    follow a closed recursion: x - mu -> a (x - mu) + sigma_up z, a = 1 + (sigma_down - sigma) sigma / (s^2 +
    sigma^2); the step to 0 multiplies by s^2 / (s^2 + sigma^2). The sampled moments must match it."""
    n, steps = 8000, 15
    sigmas = sched.get_sigmas(steps, "karras").double()
    x_T = S.initial_noise((n, 1), 11, sched.sigma_max, dtype=torch.float64)
    out = S.sample_euler_ancestral(gaussian_denoiser(), x_T, sigmas, generator=torch.Generator().manual_seed(12))
    mean, var = x_T.mean().item() - MU, x_T.var().item()
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_next == 0:
            a, up = STD ** 2 / (STD ** 2 + s ** 2), 0.0
        else:
            down, up = S.get_ancestral_step(s, s_next)
            a = 1 + (down - s) * s / (STD ** 2 + s ** 2)
        mean, var = a * mean, a * a * var + up ** 2
    assert out.mean().item() - MU == pytest.approx(mean, abs=0.015)
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.04)
    assert math.sqrt(var) < 0.45  # Euler a is first order: few steps shrink the variance (k-diffusion's too)


@pytest.mark.parametrize("sampler,steps", [(S.sample_euler_ancestral, 300), (S.sample_dpmpp_2m_sde, 50)])
def test_stochastic_samplers_sample_the_data(sched, sampler, steps):
    """With enough steps ancestral / SDE samplers draw from N(mu, s^2)."""
    n = 4000
    x_T = S.initial_noise((n, 1), 11, sched.sigma_max, dtype=torch.float64)
    out = sampler(gaussian_denoiser(), x_T, sched.get_sigmas(steps, "karras"),
                  generator=torch.Generator().manual_seed(12))
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(STD, rel=0.05)


def test_sde_heun_variant_and_eta0(sched):
    sigmas = sched.get_sigmas(40, "karras")
    x_T = _x_T(sched)
    D = gaussian_denoiser()
    ode = S.sample_dpmpp_2m(D, x_T, sigmas)
    # eta 0 makes the SDE sampler an ODE solver close to DPM++ 2M
    out = S.sample_dpmpp_2m_sde(D, x_T, sigmas, eta=0.0)
    assert (out - ode).abs().max().item() < 5e-3
    out_h = S.sample_dpmpp_2m_sde(D, x_T, sigmas, eta=0.0, solver_type="heun")
    assert (out_h - ode).abs().max().item() < 5e-3
    with pytest.raises(ValueError):
        S.sample_dpmpp_2m_sde(D, x_T, sigmas, solver_type="rk4")


def test_callback_interrupt_and_extra_args(sched):
    sigmas = sched.get_sigmas(5, "karras")
    x_T = S.initial_noise((2, 4, 2, 2), 0, sched.sigma_max)
    for name, info in S.SAMPLERS.items():
        calls, seen = [], []
        D = gaussian_denoiser(calls=calls)
        out = info.func(D, x_T, sigmas, extra_args={"cond": 1},
                        callback=lambda step, total, x, den: seen.append((step, total, x.clone())))
        assert [s[:2] for s in seen] == [(i, 5) for i in range(5)], name
        assert torch.equal(seen[-1][2], out) and out.dtype == x_T.dtype and out.shape == x_T.shape
        assert len(calls) == 5 and all(kw == {"cond": 1} for _, kw in calls)
        assert calls[0][0].shape == (2,) and calls[0][0].dtype == torch.float32
        assert torch.equal(calls[1][0], sigmas[1].expand(2))

        calls.clear()
        checks = []

        def interrupt():
            checks.append(1)
            return len(checks) > 2
        with pytest.raises(S.SamplingInterrupted) as exc:
            info.func(D, x_T, sigmas, interrupt=interrupt)
        assert len(calls) == 2, name
        assert exc.value.step == 2 and exc.value.total == 5 and exc.value.denoised is not None


def test_initial_noise_and_noise_to_sigma(sched):
    x = S.initial_noise((3, 4, 8, 8), 1234, sched.sigma_max)
    for i in range(3):
        row = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(1234 + i)) * sched.sigma_max
        assert torch.equal(x[i], row)
    assert torch.equal(S.initial_noise((1, 4, 8, 8), 1235, sched.sigma_max)[0], x[1])
    gens = S.seeded_generators(1234, 3)
    assert torch.equal(S.initial_noise((3, 4, 8, 8), 0, sched.sigma_max, generators=gens), x)
    # the generators continue their streams (SDE noise is not the initial noise again)
    assert not torch.equal(S.randn_rows((3, 4, 8, 8), gens) * sched.sigma_max, x)
    x0 = torch.ones(2, 4, 2, 2)
    noise = torch.full((2, 4, 2, 2), 2.0)
    torch.testing.assert_close(S.noise_to_sigma(x0, noise, 0.5), torch.full_like(x0, 2.0))
    torch.testing.assert_close(S.noise_to_sigma(x0, noise, torch.tensor([0.0, 1.0]))[:, 0, 0, 0],
                               torch.tensor([1.0, 3.0]))


def test_registry():
    assert list(S.SAMPLERS) == ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"]
    assert S.SCHEDULES == ("Automatic", "Uniform", "Karras", "Exponential")
    assert S.get_sampler("Euler") == (S.sample_euler, "automatic")
    assert S.get_sampler("Euler a", "Automatic") == (S.sample_euler_ancestral, "automatic")
    assert S.get_sampler("DPM++ 2M") == (S.sample_dpmpp_2m, "karras")
    assert S.get_sampler("DPM++ 2M SDE").schedule == "karras"
    assert S.get_sampler("DDIM") == (S.sample_ddim, "ddim")
    assert S.get_sampler("dpm++ 2m", "Exponential") == (S.sample_dpmpp_2m, "exponential")
    func, kind = S.get_sampler("DDIM", "Karras")
    assert func is S.sample_ddim and kind == "karras"
    with pytest.raises(ValueError, match="Euler a"):
        S.get_sampler("LMS")
    with pytest.raises(ValueError, match="Karras"):
        S.get_sampler("Euler", "SGM Uniform")
    # every default schedule key is understood by NoiseSchedule.get_sigmas
    for info in S.SAMPLERS.values():
        assert default_schedule().get_sigmas(4, info.schedule)[-1] == 0
