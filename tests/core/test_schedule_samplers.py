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
    with pytest.raises(ValueError, match="SGM Uniform"):
        sched.get_sigmas(10, "cosine")
    with pytest.raises(ValueError):
        sched.get_sigmas(0, "karras")


def test_schedule_names_as_the_webui():
    assert tuple(sch.SCHEDULE_LABELS.values()) == (
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
    for name in ("SGM Uniform", "sgm_uniform", "SGMUniform", " sgm uniform "):
        assert sch.schedule_key(name) == "sgm_uniform", name
    assert sch.schedule_key("KL OPTIMAL") == "kl_optimal" and sch.schedule_key("Automatic") == "automatic"
    with pytest.raises(ValueError, match="Align Your Steps"):
        sch.schedule_key("AYS")


def test_more_webui_schedules(sched):
    """Polyexponential, SGM Uniform, Normal, Simple, KL Optimal, Align Your Steps and Beta from their definitions
    (the webui's own functions are compared in tests/adapter/test_kdiffusion.py)."""
    n, smin, smax = 10, sched.sigma_min, sched.sigma_max
    i = torch.arange(n, dtype=torch.float64)
    for rho in (1.0, 2.5):
        poly = sched.get_sigmas(n, "Polyexponential") if rho == 1.0 else sched.get_sigmas_polyexponential(n, rho)
        expected = torch.exp((1 - i / (n - 1)) ** rho * (math.log(smax) - math.log(smin)) + math.log(smin))
        torch.testing.assert_close(poly[:-1].double(), expected, rtol=1e-5, atol=0)
        assert poly[-1] == 0
    torch.testing.assert_close(sched.get_sigmas(n, "polyexponential"), sched.get_sigmas(n, "exponential"),
                               rtol=1e-5, atol=0)

    sgm = sched.get_sigmas(n, "SGM Uniform")
    assert sgm.shape == (n + 1,) and sgm[-1] == 0
    torch.testing.assert_close(sgm[:-1], sched.t_to_sigma(torch.linspace(999, 0, n + 1)[:-1]))
    assert sgm[0] == pytest.approx(smax) and sgm[-2] > 2 * smin    # SGM's uniform steps stop short of t = 0
    torch.testing.assert_close(sched.get_sigmas(n, "Normal"), sched.get_sigmas(n, "Uniform"), rtol=1e-5, atol=0)

    simple = sched.get_sigmas(n, "Simple")
    assert torch.equal(simple[:-1], sched.sigmas[[999 - k * 100 for k in range(n)]]) and simple[-1] == 0
    assert torch.equal(sched.get_sigmas(3, "simple")[:-1], sched.sigmas[[999, 666, 333]])

    kl = sched.get_sigmas(n, "KL Optimal")
    assert kl.shape == (n + 1,) and kl[0] == pytest.approx(smax, rel=1e-6)
    assert kl[-1] == pytest.approx(smin, rel=1e-5), "the webui's KL Optimal ends at sigma_min, not 0"
    k = torch.arange(n + 1, dtype=torch.float64) / n
    expected = torch.tan(k * math.atan(smin) + (1 - k) * math.atan(smax))
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=0)

    published = sch.ALIGN_YOUR_STEPS_SIGMAS["sd15"]
    assert sched.get_sigmas(11, "Align Your Steps").tolist() == pytest.approx(list(published) + [0.0], rel=1e-6)
    ays = sched.get_sigmas(21, "align_your_steps")      # every other sigma is a published one, log-midpoints between
    torch.testing.assert_close(ays[:-1:2].double(), torch.tensor(published, dtype=torch.float64), rtol=1e-6, atol=0)
    midpoints = (torch.tensor(published[:-1]).log() + torch.tensor(published[1:]).log()) / 2
    torch.testing.assert_close(ays[1:-1:2], midpoints.exp(), rtol=1e-5, atol=0)
    assert sch.get_sigmas_align_your_steps(11, "sdxl")[1] == pytest.approx(6.315)

    beta = sched.get_sigmas(n, "Beta")
    assert beta[0] == pytest.approx(smax) and beta[-2] == pytest.approx(smin) and beta[-1] == 0
    torch.testing.assert_close(beta[:-1] + beta[:-1].flip(0), torch.full((n,), smin + smax), rtol=1e-5, atol=0)
    assert beta[1] > smin + (smax - smin) * (1 - 1 / (n - 1))   # Beta(0.6, 0.6) puts more steps at both ends
    torch.testing.assert_close(sched.get_sigmas_beta(n, alpha=1.0, beta=1.0)[:-1].double(),
                               smin + (1 - i / (n - 1)) * (smax - smin), rtol=1e-5, atol=0)
    for kind in ("polyexponential", "sgm_uniform", "normal", "simple", "align_your_steps", "beta"):
        sig = sched.get_sigmas(n, kind)
        assert torch.all(sig[1:] < sig[:-1]) and sig.dtype == torch.float32, kind


def test_discard_penultimate_sigma(sched):
    sig = sched.get_sigmas(6, "karras")
    assert torch.equal(sch.discard_penultimate_sigma(sig), torch.cat([sig[:5], sig[6:]]))


def test_ddim_schedule(sched):
    ts = sch.ddim_timesteps(20)
    assert ts.tolist() == list(range(1, 1000, 50))
    sig = sched.get_sigmas(20, "ddim_timesteps")
    assert sig.shape == (21,) and sig[-1] == 0
    assert torch.equal(sig[:-1], sched.sigmas[ts.flip(0)])
    assert torch.equal(sched.sigma_to_t(sig[:-1]), ts.flip(0).float())
    # like ldm / webui: 1000 // 30 = 33 -> 31 timesteps
    assert sch.ddim_timesteps(30).tolist() == [k * 33 + 1 for k in range(31)]
    assert sch.ddim_timesteps(1000).max() == 999 and len(sch.ddim_timesteps(1000)) == 999
    # the "DDIM" schedule type of the k-diffusion samplers: t = 1, 1 + T//n, ... below T; the DDIM sampler's own
    # steps also take t = 999 when T//n divides 999
    assert torch.equal(sched.get_sigmas(20, "DDIM"), sig)
    assert torch.equal(sched.get_sigmas(3, "ddim")[:-1], sched.sigmas[[667, 334, 1]])
    assert torch.equal(sched.get_sigmas(3, "ddim_timesteps")[:-1], sched.sigmas[[999, 667, 334, 1]])
    with pytest.raises(ValueError):
        sch.schedule_key("ddim_timesteps")            # not a schedule a user can choose


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
    (S.sample_ddim, "ddim_timesteps", 2e-2), (S.sample_dpmpp_2m, "karras", 1e-3), (S.sample_dpmpp_2m, "exponential", 1e-3),
    (S.sample_dpmpp_2m, "uniform", 1e-2), (S.sample_heun, "karras", 1e-3), (S.sample_heun, "uniform", 1e-3),
    (S.sample_dpm_2, "karras", 1e-3), (S.sample_dpm_2, "exponential", 1e-3)])
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
    """Doubling the steps halves Euler's error (order 1) and quarters DPM++ 2M's, Heun's and DPM2's (order 2)."""
    x_T = _x_T(sched)
    s50, s100 = sched.get_sigmas(50, "karras"), sched.get_sigmas(100, "karras")
    for sampler, low, high in ((S.sample_euler, 1.7, 2.3), (S.sample_dpmpp_2m, 3.3, 5.0), (S.sample_heun, 3.3, 5.0),
                               (S.sample_dpm_2, 3.3, 5.0)):
        ratio = _max_err(sampler, x_T, s50) / _max_err(sampler, x_T, s100)
        assert low < ratio < high, (sampler.__name__, ratio)


def test_lms_is_a_fourth_order_multistep_method(sched):
    """LMS integrates to sigma 0 with its own weights (no denoised shortcut): against the exact ODE solution its
    error drops by more than 10x per doubling of the steps (order 4 gives 16x in the limit), and its weights are
    the integrals of the Lagrange basis polynomials through the last four sigmas."""
    x_T = _x_T(sched)
    errors = []
    for n in (20, 40, 80):
        sigmas = sched.get_sigmas(n, "karras")
        errors.append((S.sample_lms(gaussian_denoiser(), x_T, sigmas) - exact_ode(x_T, float(sigmas[0]))).abs().max())
    assert errors[1] / errors[2] > 10, errors
    assert errors[2] < 1e-4
    t = [9.0, 5.0, 3.0, 2.0, 1.2]
    # order 1 is the Euler step; the weights of one step sum to its length (they integrate the constant 1)
    assert S.linear_multistep_coeff(1, t, 0, 0) == pytest.approx(t[1] - t[0])
    weights = [S.linear_multistep_coeff(4, t, 3, j) for j in range(4)]
    assert sum(weights) == pytest.approx(t[4] - t[3], rel=1e-12)
    # and they integrate any cubic exactly
    cubic = lambda tau: 0.3 * tau ** 3 - tau ** 2 + 2 * tau - 1
    antiderivative = lambda tau: 0.075 * tau ** 4 - tau ** 3 / 3 + tau ** 2 - tau
    assert sum(w * cubic(t[3 - j]) for j, w in enumerate(weights)) == \
        pytest.approx(antiderivative(t[4]) - antiderivative(t[3]), rel=1e-12)
    with pytest.raises(ValueError):
        S.linear_multistep_coeff(4, t, 2, 0)


def test_ddim_equals_direct_vp_ddim(sched):
    """sample_ddim on the 'ddim' sigmas == x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps on the VP latent."""
    n = 20
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * sched.sigma_max
    D = gaussian_denoiser(mu=-0.2, s=0.8)
    sigmas = S.get_sampler("DDIM").sigmas(sched, n)
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


STOCHASTIC = [S.sample_euler_ancestral, S.sample_dpm_2_ancestral, S.sample_dpmpp_sde, S.sample_dpmpp_2m_sde,
              S.sample_dpmpp_3m_sde]


@pytest.mark.parametrize("sampler", STOCHASTIC)
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


@pytest.mark.parametrize("sampler,steps", [(S.sample_euler_ancestral, 300), (S.sample_dpmpp_2m_sde, 50),
                                           (S.sample_dpm_2_ancestral, 100), (S.sample_dpmpp_sde, 200),
                                           (S.sample_dpmpp_3m_sde, 50)])
def test_stochastic_samplers_sample_the_data(sched, sampler, steps):
    """With enough steps ancestral / SDE samplers draw from N(mu, s^2). (DPM++ SDE, whose two sub-steps are both
    ancestral, approaches the variance slowly: std 0.468 at 50 steps, 0.492 at 200, k-diffusion's the same.)"""
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


def test_eta0_makes_the_other_stochastic_samplers_ode_solvers(sched):
    """eta 0: DPM2 a is DPM2 exactly; DPM++ SDE is DPM-Solver++(2S) and DPM++ 3M SDE is DPM-Solver++(3M), both
    on the ODE, so they land on its solution (3M closer than 2M, at the same steps)."""
    sigmas = sched.get_sigmas(40, "karras")
    x_T = _x_T(sched)
    D = gaussian_denoiser()
    assert torch.equal(S.sample_dpm_2_ancestral(D, x_T, sigmas, eta=0.0), S.sample_dpm_2(D, x_T, sigmas))
    reference = _ref_before_last_step(x_T, sigmas)
    err_sde = (S.sample_dpmpp_sde(D, x_T, sigmas, eta=0.0) - reference).abs().max().item()
    err_3m = (S.sample_dpmpp_3m_sde(D, x_T, sigmas, eta=0.0) - reference).abs().max().item()
    err_2m = (S.sample_dpmpp_2m_sde(D, x_T, sigmas, eta=0.0) - reference).abs().max().item()
    assert err_sde < 5e-3 and err_3m < 2e-3, (err_sde, err_3m)
    assert err_3m < 0.5 * err_2m, (err_3m, err_2m)


def test_one_step_sde_samplers_return_the_denoised_latent(sched):
    sigmas = torch.tensor([sched.sigma_max, 0.0])
    x_T = _x_T(sched)
    D = gaussian_denoiser()
    expected = D(x_T, sigmas[:1].expand(x_T.shape[0]).double())
    for sampler in (S.sample_dpmpp_2m_sde, S.sample_dpmpp_3m_sde):
        torch.testing.assert_close(sampler(D, x_T, sigmas, generator=torch.Generator().manual_seed(0)), expected)


# ------------------------------------------------------------------------------------------------------------
# Brownian-tree noise
# ------------------------------------------------------------------------------------------------------------

def test_brownian_tree_noise_is_one_seeded_brownian_motion_per_image(sched):
    """Each image's noise is the normalised increment of its own Brownian motion W_i: unit Gaussian, additive over
    adjacent intervals, independent of the order and number of earlier queries, and image i of a batch equals the
    tree of its seed alone (torchsde.BrownianTree over [min positive sigma, max sigma], entropy = the seed)."""
    import torchsde

    sigmas = sched.get_sigmas(10, "exponential")
    x = torch.zeros(3, 4, 16, 16)
    seeds = [100, 101, 102]
    noise = S.brownian_tree_noise_sampler(x, sigmas, seeds)
    s0, s1, s2 = sigmas[2], sigmas[4], sigmas[7]
    z02, z01, z12 = noise(s0, s2), noise(s0, s1), noise(s1, s2)
    assert z02.shape == x.shape and z02.dtype == torch.float32
    torch.testing.assert_close(z02 * (s0 - s2).sqrt(), z01 * (s0 - s1).sqrt() + z12 * (s1 - s2).sqrt(),
                               rtol=0, atol=1e-5)
    assert abs(z02.mean().item()) < 0.05 and z02.std().item() == pytest.approx(1.0, abs=0.05)
    fresh = S.brownian_tree_noise_sampler(x, sigmas, seeds)
    assert torch.equal(fresh(s1, s2), z12), "a value depends only on its two sigmas"
    assert torch.equal(noise(s2, s0), -z02)
    single = S.brownian_tree_noise_sampler(x[1:2], sigmas, [101])
    assert torch.equal(single(s0, s2), z02[1:2])
    assert not torch.allclose(z02[0], z02[1], atol=0.5)

    tree = torchsde.BrownianTree(sigmas[sigmas > 0].min(), torch.zeros(4, 16, 16), sigmas.max(), entropy=102)
    torch.testing.assert_close(z02[2], -tree(s2, s0) / (s0 - s2).sqrt(), rtol=0, atol=0)  # W(s2) - W(s0)
    with pytest.raises(ValueError, match="seeds"):
        S.brownian_tree_noise_sampler(x, sigmas, [1, 2])
    wide = S.brownian_tree_noise_sampler(x.double(), sigmas, seeds)(s0, s2)
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), z02)


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
        per_step = 2 if info.second_order else 1          # the step to sigma 0 makes one call
        assert len(calls) == 4 * per_step + 1 and all(kw == {"cond": 1} for _, kw in calls), name
        assert all(sigma.shape == (2,) and sigma.dtype == torch.float32 for sigma, _ in calls)
        assert [c[0][0].item() for c in calls[::per_step]] == sigmas[:5].tolist(), name

        calls.clear()
        checks = []

        def interrupt():
            checks.append(1)
            return len(checks) > 2
        with pytest.raises(S.SamplingInterrupted) as exc:
            info.func(D, x_T, sigmas, interrupt=interrupt)
        assert len(calls) == 2 * per_step, name
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
    """The webui's samplers with their "Automatic" schedule, noise and sigma options (the table itself is compared
    with the webui's in tests/adapter/test_kdiffusion.py)."""
    assert list(S.SAMPLERS) == ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
                                "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM"]
    assert S.SCHEDULES == tuple(sch.SCHEDULE_LABELS.values()) and S.SCHEDULES[:4] == (
        "Automatic", "Uniform", "Karras", "Exponential")
    automatic = {name: S.get_sampler(name).schedule for name in S.SAMPLERS}
    assert automatic == {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                         "DPM++ 2M SDE Heun": "exponential", "DPM++ 3M SDE": "exponential", "Euler a": "automatic",
                         "Euler": "automatic", "LMS": "automatic", "Heun": "automatic", "DPM2": "karras",
                         "DPM2 a": "karras", "DDIM": "ddim_timesteps"}
    assert S.get_sampler("Euler a", "Automatic") == S.SAMPLERS["Euler a"]
    assert S.STOCHASTIC_SAMPLERS == {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Euler a",
                                     "DPM2 a"}
    assert {n for n, i in S.SAMPLERS.items() if i.noise == "brownian"} == {
        "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    assert {n for n, i in S.SAMPLERS.items() if i.discard_penultimate_sigma} == {"DPM++ 3M SDE", "DPM2", "DPM2 a"}
    new = {"DPM++ 3M SDE": S.sample_dpmpp_3m_sde, "DPM++ SDE": S.sample_dpmpp_sde, "Heun": S.sample_heun,
           "LMS": S.sample_lms, "DPM2": S.sample_dpm_2, "DPM2 a": S.sample_dpm_2_ancestral}
    assert all(S.get_sampler(name.lower()).func is func for name, func in new.items())
    info = S.get_sampler("dpm++ 2m", "Exponential")
    assert (info.func, info.schedule) == (S.sample_dpmpp_2m, "exponential")
    assert S.get_sampler("Euler", "SGMUniform").schedule == "sgm_uniform"
    info = S.get_sampler("DDIM", "Karras")
    assert info.func is S.sample_ddim and info.schedule == "karras"
    with pytest.raises(ValueError, match="DPM2 a"):
        S.get_sampler("UniPC")
    with pytest.raises(ValueError, match="KL Optimal"):
        S.get_sampler("Euler", "cosine")
    # every default schedule key is understood by NoiseSchedule.get_sigmas
    for info in S.SAMPLERS.values():
        assert default_schedule().get_sigmas(4, info.schedule)[-1] == 0


def test_sampler_sigmas_and_noise_arguments(sched):
    """DPM2, DPM2 a and DPM++ 3M SDE sample one step more and drop the next-to-last sigma (the webui's
    discard_next_to_last_sigma); ancestral samplers get the per-image generators, SDE samplers a Brownian tree
    per image seeded with the image's seed, DPM++ 2M SDE Heun its solver type."""
    three_m = S.get_sampler("DPM++ 3M SDE").sigmas(sched, 5)
    assert torch.equal(three_m, sch.discard_penultimate_sigma(sched.get_sigmas(6, "exponential")))
    assert three_m.shape == (6,) and three_m[-1] == 0 and three_m[-2] > sched.get_sigmas(6, "exponential")[-2]
    assert torch.equal(S.get_sampler("DPM2", "Exponential").sigmas(sched, 4),
                       sch.discard_penultimate_sigma(sched.get_sigmas(5, "exponential")))
    assert torch.equal(S.get_sampler("DPM++ 2M").sigmas(sched, 5), sched.get_sigmas(5, "karras"))

    x = torch.zeros(2, 4, 8, 8)
    sigmas = S.get_sampler("DPM++ SDE").sigmas(sched, 5)
    generators = S.seeded_generators(40, 2)
    assert S.get_sampler("Euler").noise_args(x, sigmas, generators, [40, 41]) == {}
    assert S.get_sampler("DPM2 a").noise_args(x, sigmas, generators, [40, 41]) == {"generator": generators}
    heun = S.get_sampler("DPM++ 2M SDE Heun").noise_args(x, sigmas, generators, [40, 41])
    assert set(heun) == {"noise_sampler", "solver_type"} and heun["solver_type"] == "heun"
    brownian = S.get_sampler("DPM++ SDE").noise_args(x, sigmas, generators, [40, 41])["noise_sampler"]
    expected = S.brownian_tree_noise_sampler(x, sigmas, [40, 41])
    assert torch.equal(brownian(sigmas[1], sigmas[2]), expected(sigmas[1], sigmas[2]))


def test_missing_packages_are_named_before_sampling(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torchsde", "scipy") else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install torchsde"):
        S.get_sampler("DPM++ 3M SDE")
    with pytest.raises(ValueError, match="pip install scipy"):
        S.get_sampler("Euler", "Beta")
    assert S.get_sampler("DPM2 a").func is S.sample_dpm_2_ancestral
