"""Samplers over a denoiser ``D(x, sigma, **extra) -> x0`` (method §9), in k-diffusion's style.

Every sampler has the signature ``sample_*(model, x, sigmas, extra_args=None, callback=None, interrupt=None,
...) -> x`` where

* ``model(x, sigma, **extra_args)`` returns the denoised ``x0``; ``sigma`` is passed as a float32 (B,) tensor,
* ``x`` is the starting latent in sigma space (``initial_noise`` already multiplied by ``sigmas[0]``),
* ``sigmas`` is a descending 1-D schedule, normally ending in 0 (from :mod:`lib_colorize.schedule`); there are
  ``len(sigmas) - 1`` steps, one model call per step, two for the second-order samplers (Heun, DPM2, DPM2 a,
  DPM++ SDE) except on their step to sigma 0,
* ``callback(step, total, x, denoised)`` runs after each step, ``step`` = 0-based index of the step just done,
  ``total = len(sigmas) - 1``, ``x`` = the updated latent, ``denoised`` = the step's first model output,
* ``interrupt()`` is checked before each step; when it returns True :class:`SamplingInterrupted` is raised,
  carrying the latent and last ``denoised`` reached so far.

Randomness (ancestral / SDE samplers) comes only from ``noise_sampler(sigma, sigma_next) -> unit Gaussian like
x`` or, when none is given, from ``generator``: a ``torch.Generator`` or one generator per batch row (see
:func:`seeded_generators`), so results are reproducible and a row does not depend on the batch size. The webui's
SDE samplers take their noise from a Brownian tree per image, :func:`brownian_tree_noise_sampler`; the registry
(:data:`SAMPLERS`, :meth:`SamplerInfo.noise_args`) says which noise each webui sampler gets.

The formulas are k-diffusion's ``sampling.py`` (PyPI 0.1.1.post1, byte-identical to the commit ab527a9 the webui
v1.10.1 pins); ``tests/adapter/test_kdiffusion.py`` runs each sampler beside k-diffusion's on the same inputs.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .schedule import SCHEDULE_LABELS, NoiseSchedule, append_dims, discard_penultimate_sigma, schedule_key

__all__ = [
    "SamplingInterrupted", "GeneratorArg", "NoiseSampler", "Callback",
    "seeded_generators", "randn_rows", "default_noise_sampler", "brownian_tree_noise_sampler", "initial_noise",
    "noise_to_sigma", "to_d", "get_ancestral_step", "linear_multistep_coeff",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
    "sample_ddim", "SamplerInfo", "SAMPLERS", "SCHEDULES", "STOCHASTIC_SAMPLERS", "get_sampler",
]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]
Interrupt = Callable[[], bool]


class SamplingInterrupted(Exception):
    """Raised when the ``interrupt`` hook returns True. ``x`` is the latent after ``step`` completed steps
    (the input latent when ``step == 0``), ``denoised`` the last model output (None when ``step == 0``)."""

    def __init__(self, step: int, total: int, x: torch.Tensor, denoised: Optional[torch.Tensor]):
        self.step = step
        self.total = total
        self.x = x
        self.denoised = denoised
        super().__init__(f"sampling interrupted after {step} of {total} steps")


# ----------------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------------

def seeded_generators(seed: int, batch_size: int, device: Union[str, torch.device] = "cpu") -> list:
    """One ``torch.Generator`` per batch row, row ``i`` seeded with ``seed + i`` (the webui's per-image seeds).

    CPU generators (the default) give the same numbers on every device.
    """
    return [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(int(batch_size))]


def randn_rows(shape: Sequence[int], generator: GeneratorArg, device: Union[str, torch.device, None] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor of ``shape``. ``generator`` is None (global RNG), one ``torch.Generator`` (draws the
    whole tensor), or a sequence of generators, one per row ``shape[0]`` (row ``i`` drawn from generator ``i``).
    Numbers are drawn on the generator's device, in float32, then moved to ``device``/``dtype``."""
    shape = tuple(int(s) for s in shape)
    if generator is None:
        out = torch.randn(shape, dtype=torch.float32)
    elif isinstance(generator, torch.Generator):
        out = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        out = torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                           for g in generators])
    return out.to(device=device if device is not None else out.device, dtype=dtype)


def default_noise_sampler(x: torch.Tensor, generator: GeneratorArg = None) -> NoiseSampler:
    """Per-step Gaussian noise: ``noise_sampler(sigma, sigma_next) = randn_like(x)`` drawn from ``generator``
    (see :func:`randn_rows`). Unlike k-diffusion's Brownian-tree sampler, the noise does not depend on the
    sigmas, only on the order of the calls."""
    def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return randn_rows(x.shape, generator, device=x.device, dtype=x.dtype)
    return noise_sampler


def brownian_tree_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]) -> NoiseSampler:
    """The webui's noise for the SDE samplers: one Brownian motion ``W_i`` per image, sampled as a torchsde
    ``BrownianTree``, and ``noise_sampler(sigma, sigma_next) = (W_i(sigma_next) - W_i(sigma)) / sqrt(|sigma_next -
    sigma|)`` (a unit Gaussian whose value depends on the two sigmas, not on how many were drawn before), stacked
    over the images (k-diffusion ``BrownianTreeNoiseSampler``, as the webui's ``create_noise_sampler`` builds it).

    Seeding, exactly: image ``i``'s tree is ``torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=seeds[i])``
    with ``w0 = zeros(x.shape[1:])`` in float32 on the CPU, ``sigma_min`` the smallest positive entry of
    ``sigmas`` and ``sigma_max`` its largest, both of the whole schedule; ``seeds[i]`` is the image's own seed
    (``seed + i`` in a batch: the webui's ``p.all_seeds`` of the batch), so image ``i`` of a batch gets the tree of
    the single generation of its seed. The tree draws its normals with torch's CPU generator (torchsde's
    ``_randn``, which the webui replaces by its ``randn_local``: the same numbers on a CPU, and with the webui's
    "Random number generator source: CPU" on any device); the result is moved to ``x``'s device and dtype.
    Needs torchsde (the webui pins 0.2.6).
    """
    try:
        import torchsde
    except ImportError:
        raise ImportError("the SDE samplers' Brownian-tree noise needs torchsde (pip install torchsde; "
                          "the webui ships it)") from None
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != x.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    w0 = torch.zeros(x.shape[1:], dtype=torch.float32)
    trees = [torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=seed) for seed in seeds]

    def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).cpu()
        sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32).cpu()
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with warnings.catch_warnings():
            # DPM++ SDE asks at exp(-(-log sigma)), a rounding outside [sigma_min, sigma_max]; torchsde clamps the
            # query to the interval (as in the webui) and warns every time
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            increment = torch.stack([tree(low, high) for tree in trees]) * sign
        return (increment / (high - low).sqrt()).to(device=x.device, dtype=x.dtype)

    return noise_sampler


def initial_noise(shape: Sequence[int], seed: int, sigma_max: float, *, generators: GeneratorArg = None,
                  device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Starting latent ``x_T = sigma_max * randn(shape)`` with row ``i`` drawn from a CPU generator seeded
    ``seed + i`` (A1111 convention, method §12.2 row 3: scaled by ``sigma_max``, i.e. ``sigmas[0]``).

    Pass ``generators`` (e.g. ``seeded_generators(seed, B)``) instead to draw from them and then keep using the
    same generators as the SDE/ancestral ``generator``: the per-step noise then continues each image's stream
    (``seed`` is ignored in that case).
    """
    shape = tuple(int(s) for s in shape)
    if generators is None:
        generators = seeded_generators(seed, shape[0])
    return randn_rows(shape, generators, device=device, dtype=dtype) * sigma_max


def noise_to_sigma(x0: torch.Tensor, noise: torch.Tensor, sigma: Any) -> torch.Tensor:
    """img2img start: ``x = x0 + sigma * noise`` (``noise`` unit Gaussian, ``sigma`` scalar or per row), the
    sigma-space form of ``q_sample`` (``sqrt(a) x0 + sqrt(1-a) noise`` divided by ``sqrt(a)``)."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    return x0 + append_dims(sigma, x0.ndim) * noise


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------

def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: Any, sigma_to: Any, eta: float = 1.0) -> Tuple[Any, Any]:
    """Split an ancestral step ``sigma_from -> sigma_to`` into a deterministic step to ``sigma_down`` plus fresh
    noise of std ``sigma_up``: ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) /
    sigma_from^2))``, ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)`` (floats or 0-d tensors)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def linear_multistep_coeff(order: int, t: Sequence[float], i: int, j: int) -> float:
    """Weight of ``d_{i-j}`` in the variable-step linear multistep (Adams-Bashforth) step from ``t_i`` to
    ``t_{i+1}``: ``c_j = int_{t_i}^{t_{i+1}} l_j(tau) dtau`` with the Lagrange basis polynomial through the last
    ``order`` nodes, ``l_j(tau) = prod_{k < order, k != j} (tau - t_{i-k}) / (t_{i-j} - t_{i-k})``.

    Integrated exactly (k-diffusion integrates the same polynomial numerically, ``scipy.integrate.quad``).
    """
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes = [float(t[i - k]) for k in range(order) if k != j]
    numerator = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    antiderivative = numerator.integ()
    scale = float(np.prod([float(t[i - j]) - node for node in nodes]))
    return float((antiderivative(float(t[i + 1])) - antiderivative(float(t[i]))) / scale)


class _Loop:
    """Step bookkeeping shared by all samplers: sigmas on x's device, per-row sigma, interrupt and callback."""

    def __init__(self, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict],
                 callback: Optional[Callback], interrupt: Optional[Interrupt]):
        self.model = model
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)
        if self.sigmas.ndim != 1 or self.sigmas.numel() < 2:
            raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (ending in 0)")
        self.sigmas_list = [float(s) for s in self.sigmas.cpu()]
        self.total = len(self.sigmas_list) - 1
        self.extra_args = {} if extra_args is None else extra_args
        self.callback = callback
        self.interrupt = interrupt
        self.s_in = torch.ones([x.shape[0]], dtype=torch.float32, device=x.device)
        self.last_denoised: Optional[torch.Tensor] = None

    def denoise(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The step's first model call, at ``sigmas[i]``; checks ``interrupt`` first."""
        if self.interrupt is not None and self.interrupt():
            raise SamplingInterrupted(i, self.total, x, self.last_denoised)
        denoised = self.evaluate(x, self.sigmas[i])
        self.last_denoised = denoised
        return denoised

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A model call at the 0-d ``sigma`` (the inner evaluations of the second-order samplers)."""
        return self.model(x, sigma * self.s_in, **self.extra_args)

    def done(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i, self.total, x, denoised)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR in sigma space, ``lambda = -log sigma`` (DPM-Solver's time variable)."""
    return sigma.log().neg()


def _sigma(lam: torch.Tensor) -> torch.Tensor:
    """``sigma = exp(-lambda)``, the inverse of :func:`_lambda`."""
    return lam.neg().exp()


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                 callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn):
    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i``."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas_list[i], loop.sigmas_list[i + 1]
        x = x + to_d(x, loop.sigmas[i], denoised) * (sigma_next - sigma)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: Optional[Dict] = None, callback: Optional[Callback] = None,
                           interrupt: Optional[Interrupt] = None, eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: Optional[NoiseSampler] = None,
                           generator: GeneratorArg = None) -> torch.Tensor:
    """Ancestral Euler ("Euler a"): with ``(sigma_down, sigma_up) = get_ancestral_step(sigma_i, sigma_{i+1}, eta)``,
    ``x = x_i + (sigma_down - sigma_i) d_i``, then ``x_{i+1} = x + s_noise sigma_up z`` (no noise on the last
    step to sigma 0), ``z = noise_sampler(sigma_i, sigma_{i+1})``."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas_list[i], loop.sigmas_list[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        x = x + to_d(x, loop.sigmas[i], denoised) * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_sampler(loop.sigmas[i], loop.sigmas[i + 1]) * (s_noise * sigma_up)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1; their
    Algorithm 2 without churn, the webui's default): with ``d_i = (x_i - D(x_i, sigma_i)) / sigma_i`` and
    ``dt = sigma_{i+1} - sigma_i``, the Euler predictor ``x' = x_i + dt d_i``, its slope
    ``d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1}``, and ``x_{i+1} = x_i + dt (d_i + d') / 2``.
    The step to sigma 0 is the Euler step alone. Two model calls per step, one on the last."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas[i], loop.sigmas[i + 1]
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if loop.sigmas_list[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, loop.evaluate(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * dt
        loop.done(i, x, denoised)
    return x


def _dpm_solver_2_step(loop: _Loop, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor,
                       sigma_to: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver-2 step in sigma (Lu et al. 2022, DPM-Solver, Algorithm 1 with ``r = 1/2``, in Karras et al.'s
    ODE form): the midpoint in log sigma ``sigma_mid = exp((log sigma + log sigma_to) / 2)``, the Euler half-step
    ``x' = x + (sigma_mid - sigma) d``, and ``x + (sigma_to - sigma) (x' - D(x', sigma_mid)) / sigma_mid``."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, loop.evaluate(x_mid, sigma_mid))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                 callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """DPM2: DPM-Solver-2 steps (Lu et al. 2022) in the frame of Karras et al. 2022, Algorithm 2 without churn
    (k-diffusion ``sample_dpm_2``): ``sigma_mid = sqrt(sigma_i sigma_{i+1})`` (the midpoint in log sigma),
    ``x' = x_i + (sigma_mid - sigma_i) d_i``, ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x', sigma_mid)`` with
    ``d(x, sigma) = (x - D(x, sigma)) / sigma``. The step to sigma 0 is an Euler step. The webui drops the
    penultimate sigma of its schedule for this sampler (:attr:`SamplerInfo.discard_penultimate_sigma`)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas[i], loop.sigmas[i + 1]
        d = to_d(x, sigma, denoised)
        if loop.sigmas_list[i + 1] == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = _dpm_solver_2_step(loop, x, d, sigma, sigma_next)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: Optional[Dict] = None, callback: Optional[Callback] = None,
                           interrupt: Optional[Interrupt] = None, eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: Optional[NoiseSampler] = None,
                           generator: GeneratorArg = None) -> torch.Tensor:
    """DPM2 a: ancestral sampling with DPM-Solver-2 steps (k-diffusion ``sample_dpm_2_ancestral``). With
    ``(sigma_down, sigma_up) = get_ancestral_step(sigma_i, sigma_{i+1}, eta)``: the DPM2 step of
    :func:`sample_dpm_2` from ``sigma_i`` to ``sigma_down`` (midpoint ``sqrt(sigma_i sigma_down)``), then
    ``x_{i+1} = x + s_noise sigma_up z``, ``z = noise_sampler(sigma_i, sigma_{i+1})``; when ``sigma_down = 0``
    (the step to sigma 0) an Euler step and no noise."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas[i], loop.sigmas[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_solver_2_step(loop, x, d, sigma, torch.as_tensor(sigma_down, device=x.device))
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_lms(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
               callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None,
               order: int = 4) -> torch.Tensor:
    """LMS: the variable-step linear multistep (Adams-Bashforth) method on the probability-flow ODE
    ``dx/dsigma = d(x, sigma)`` (k-diffusion ``sample_lms``; Karras et al. 2022, §3, on higher-order ODE
    solvers): ``x_{i+1} = x_i + sum_{j < m} c_j d_{i-j}``, ``m = min(i + 1, order)``, with the weights
    ``c_j = linear_multistep_coeff(m, sigmas, i, j)`` of the Lagrange polynomial through the last ``m`` slopes."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    slopes: List[torch.Tensor] = []
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        slopes = (slopes + [to_d(x, loop.sigmas[i], denoised)])[-order:]
        current_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(current_order, loop.sigmas_list, i, j) for j in range(current_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(slopes)))
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                    callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), in ``lambda = -log sigma``:
    ``h = lambda_{i+1} - lambda_i``; first step and the step to sigma 0 use ``D_i`` (first order), otherwise
    ``r = h_{i-1} / h``, ``D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``;
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D'`` (the step to 0 returns ``D_i``)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    old_denoised = None
    s = loop.sigmas_list
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        if s[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -torch.log(loop.sigmas[i]), -torch.log(loop.sigmas[i + 1])
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                h_last = t - (-torch.log(loop.sigmas[i - 1]))
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                     callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None,
                     eta: float = 1.0, s_noise: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                     generator: GeneratorArg = None, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): the single-step second-order DPM-Solver++(2S) (Lu et
    al. 2022, DPM-Solver++, Algorithm 1) with an ancestral split of both of its sub-steps. In ``lambda = -log
    sigma``, ``h = lambda_{i+1} - lambda_i``, ``s = lambda_i + r h``:

    1. ``(sd, su) = get_ancestral_step(sigma_i, sigma(s), eta)``, ``s' = lambda(sd)``:
       ``x' = (sigma(s')/sigma_i) x_i - expm1(lambda_i - s') D_i + s_noise su z_1``, ``z_1 =
       noise_sampler(sigma_i, sigma(s))``;
    2. ``(sd, su) = get_ancestral_step(sigma_i, sigma_{i+1}, eta)``, ``l' = lambda(sd)``,
       ``D' = (1 - 1/(2r)) D_i + 1/(2r) D(x', sigma(s))``:
       ``x_{i+1} = (sigma(l')/sigma_i) x_i - expm1(lambda_i - l') D' + s_noise su z_2``, ``z_2 =
       noise_sampler(sigma_i, sigma_{i+1})``.

    The step to sigma 0 is an Euler step. Two model calls and two noise draws per step. The webui gives it the
    Brownian-tree noise (:func:`brownian_tree_noise_sampler`); without ``noise_sampler`` it is per-draw Gaussian
    from ``generator``.
    """
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    fac = 1 / (2 * r)
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        sigma, sigma_next = loop.sigmas[i], loop.sigmas[i + 1]
        if loop.sigmas_list[i + 1] == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            t, t_next = _lambda(sigma), _lambda(sigma_next)
            h = t_next - t
            s = t + h * r
            sigma_t, sigma_s, sigma_t_next = _sigma(t), _sigma(s), _sigma(t_next)
            sd, su = get_ancestral_step(sigma_t, sigma_s, eta)
            s_ = _lambda(torch.as_tensor(sd))
            x_2 = (_sigma(s_) / sigma_t) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_t, sigma_s) * (s_noise * su)
            denoised_2 = loop.evaluate(x_2, sigma_s)
            sd, su = get_ancestral_step(sigma_t, sigma_t_next, eta)
            t_next_ = _lambda(torch.as_tensor(sd))
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / sigma_t) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_t, sigma_t_next) * (s_noise * su)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                        callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                        generator: GeneratorArg = None, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, DPM-Solver++, the multistep second-order solver of the SDE;
    k-diffusion ``sample_dpmpp_2m_sde``), ``lambda = -log sigma``, ``h = lambda_{i+1} - lambda_i``,
    ``eta_h = eta h``:

    ``x = (sigma_{i+1}/sigma_i) e^{-eta_h} x_i + (1 - e^{-h-eta_h}) D_i``;
    from the second step, with ``r = h_{i-1}/h``: midpoint ``x += 1/2 (1 - e^{-h-eta_h}) (D_i - D_{i-1}) / r``,
    heun ``x += ((1 - e^{-h-eta_h})/(-h-eta_h) + 1) (D_i - D_{i-1}) / r``;
    then ``x += sigma_{i+1} sqrt(1 - e^{-2 eta_h}) s_noise z``. The step to sigma 0 returns ``D_i``.

    The webui gives it the Brownian-tree noise (:func:`brownian_tree_noise_sampler`); without ``noise_sampler``
    it is per-step Gaussian from ``generator``. One step alone (``sigmas = [sigma, 0]``) returns ``D``, where
    k-diffusion fails (it reads an unset ``h``).
    """
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s = loop.sigmas_list
    old_denoised = None
    h_last = None
    h = None
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        if s[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -torch.log(loop.sigmas[i]), -torch.log(loop.sigmas[i + 1])
            h = t_next - t
            eta_h = eta * h
            x = (s[i + 1] / s[i]) * torch.exp(-eta_h) * x + (-torch.expm1(-h - eta_h)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-torch.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-torch.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(loop.sigmas[i], loop.sigmas[i + 1])
                x = x + noise * (s[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise)
        old_denoised = denoised
        h_last = h
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                        callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                        generator: GeneratorArg = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): the third-order multistep DPM-Solver++ (Lu et
    al. 2022, DPM-Solver++, §4 multistep solvers) on the SDE of :func:`sample_dpmpp_2m_sde`. In ``lambda = -log
    sigma``, ``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h``:

    ``x = e^{-h_eta} x_i + (1 - e^{-h_eta}) D_i``, with ``phi_2 = (e^{-h_eta} - 1)/h_eta + 1`` and
    ``phi_3 = phi_2 / h_eta - 1/2``;
    from the third step, with ``r_0 = h_{i-1}/h``, ``r_1 = h_{i-2}/h``, ``d1_0 = (D_i - D_{i-1})/r_0``,
    ``d1_1 = (D_{i-1} - D_{i-2})/r_1``, ``d_1 = d1_0 + (d1_0 - d1_1) r_0/(r_0 + r_1)``,
    ``d_2 = (d1_0 - d1_1)/(r_0 + r_1)``: ``x += phi_2 d_1 - phi_3 d_2``;
    on the second step (``r = h_{i-1}/h``): ``x += phi_2 (D_i - D_{i-1})/r``;
    then ``x += sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z``. The step to sigma 0 returns ``D_i``.

    The default of the original ColorizeDiffusion app (mid-2024), with the webui's Brownian-tree noise
    (:func:`brownian_tree_noise_sampler`) and schedule (exponential, penultimate sigma dropped). One step alone
    returns ``D``, where k-diffusion fails (it reads an unset ``h``).
    """
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        if loop.sigmas_list[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(loop.sigmas[i + 1]) - _lambda(loop.sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                noise = noise_sampler(loop.sigmas[i], loop.sigmas[i + 1])
                x = x + noise * (loop.sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), written in sigma space.

    The DDIM update ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` on the VP latent ``x_vp = sqrt(a) x``
    (``a = 1/(sigma^2+1)``, ``eps = (x - x0)/sigma``) becomes, after dividing by ``sqrt(a_prev)``,
    ``x_{i+1} = x0 + sigma_{i+1} eps = D_i + (sigma_{i+1}/sigma_i)(x_i - D_i)``, which is exactly one Euler step
    in sigma. Use it with the DDIM steps ('ddim_timesteps', ``NoiseSchedule.get_sigmas_ddim_timesteps``: the
    uniform timesteps ``range(0, 1000, 1000 // n) + 1``, descending, then 0) to get DDIM; with another schedule it
    is Euler on that schedule.
    """
    loop = _Loop(model, x, sigmas, extra_args, callback, interrupt)
    s = loop.sigmas_list
    for i in range(loop.total):
        denoised = loop.denoise(i, x)
        x = denoised + (s[i + 1] / s[i]) * (x - denoised)
        loop.done(i, x, denoised)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

#: What noise a sampler draws: none, ``generator`` (per-step Gaussian from each image's seeded stream) or a
#: Brownian tree per image (:func:`brownian_tree_noise_sampler`).
NOISE_KINDS = ("none", "generator", "brownian")


class SamplerInfo(NamedTuple):
    """A webui sampler: its function and the options of its row in the webui's ``samplers_k_diffusion`` table.

    ``schedule``: the key of the webui's "Automatic" for it (its ``scheduler`` option; 'automatic' = uniform when
    it has none; 'ddim_timesteps', DDIM's own steps, for DDIM), or the explicit schedule after :func:`get_sampler`; ``noise``: one of
    :data:`NOISE_KINDS` ('brownian' = the webui's ``brownian_noise``); ``discard_penultimate_sigma``: the
    webui's ``discard_next_to_last_sigma``; ``second_order``: two model calls per step; ``options``: extra
    keyword arguments of the function (the webui's ``solver_type``).
    """
    func: Callable[..., torch.Tensor]
    schedule: str
    noise: str = "none"
    discard_penultimate_sigma: bool = False
    second_order: bool = False
    options: Tuple[Tuple[str, Any], ...] = ()

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
        """The schedule for ``steps`` steps as the webui's ``KDiffusionSampler.get_sigmas`` builds it: when the
        penultimate sigma is discarded, ``steps + 1`` sigmas and then the next-to-last dropped."""
        if self.discard_penultimate_sigma:
            return discard_penultimate_sigma(schedule.get_sigmas(steps + 1, self.schedule))
        return schedule.get_sigmas(steps, self.schedule)

    def noise_args(self, x: torch.Tensor, sigmas: torch.Tensor, generators: Sequence[torch.Generator],
                   seeds: Sequence[int]) -> Dict[str, Any]:
        """Keyword arguments of :attr:`func` for a batch whose image ``i`` has the generator ``generators[i]``
        and the seed ``seeds[i]``: the ``generator`` list, or the Brownian ``noise_sampler`` over the whole
        ``sigmas``, plus :attr:`options`."""
        kwargs: Dict[str, Any] = dict(self.options)
        if self.noise == "generator":
            kwargs["generator"] = list(generators)
        elif self.noise == "brownian":
            kwargs["noise_sampler"] = brownian_tree_noise_sampler(x, sigmas, seeds)
        return kwargs


#: webui sampler name -> :class:`SamplerInfo`, in the order and with the options of the webui v1.10.1's
#: ``samplers_k_diffusion`` (``modules/sd_samplers_kdiffusion.py``), then DDIM.
SAMPLERS: Dict[str, SamplerInfo] = {
    "DPM++ 2M": SamplerInfo(sample_dpmpp_2m, "karras"),
    "DPM++ SDE": SamplerInfo(sample_dpmpp_sde, "karras", "brownian", second_order=True),
    "DPM++ 2M SDE": SamplerInfo(sample_dpmpp_2m_sde, "exponential", "brownian"),
    "DPM++ 2M SDE Heun": SamplerInfo(sample_dpmpp_2m_sde, "exponential", "brownian",
                                     options=(("solver_type", "heun"),)),
    "DPM++ 3M SDE": SamplerInfo(sample_dpmpp_3m_sde, "exponential", "brownian", discard_penultimate_sigma=True),
    "Euler a": SamplerInfo(sample_euler_ancestral, "automatic", "generator"),
    "Euler": SamplerInfo(sample_euler, "automatic"),
    "LMS": SamplerInfo(sample_lms, "automatic"),
    "Heun": SamplerInfo(sample_heun, "automatic", second_order=True),
    "DPM2": SamplerInfo(sample_dpm_2, "karras", discard_penultimate_sigma=True, second_order=True),
    "DPM2 a": SamplerInfo(sample_dpm_2_ancestral, "karras", "generator", discard_penultimate_sigma=True,
                          second_order=True),
    "DDIM": SamplerInfo(sample_ddim, "ddim_timesteps"),
}

#: webui scheduler names ("Schedule type"). "Automatic" = the sampler's default from :data:`SAMPLERS`.
SCHEDULES: Tuple[str, ...] = tuple(SCHEDULE_LABELS.values())

#: Samplers that draw noise (take ``generator`` / ``noise_sampler``).
STOCHASTIC_SAMPLERS = frozenset(name for name, info in SAMPLERS.items() if info.noise != "none")


def _check_available(info: SamplerInfo) -> None:
    """The optional packages a sampler and schedule need, named before anything is loaded."""
    if info.noise == "brownian" and importlib.util.find_spec("torchsde") is None:
        raise ValueError("the SDE samplers need torchsde for their Brownian-tree noise (pip install torchsde)")
    if info.schedule == "beta" and importlib.util.find_spec("scipy") is None:
        raise ValueError("the Beta schedule needs scipy (pip install scipy)")


def get_sampler(name: str, schedule: Optional[str] = None) -> SamplerInfo:
    """Resolve a webui sampler name and schedule name (case-insensitive) to its :class:`SamplerInfo`.

    ``schedule`` None or "Automatic" keeps the sampler's default ('automatic' = uniform, 'karras', 'exponential'
    or 'ddim_timesteps'); otherwise the schedule's key (label, key or alias of :data:`~lib_colorize.schedule.SCHEDULE_LABELS`).
    DDIM with an explicit schedule is Euler on that schedule (see :func:`sample_ddim`). Raises ValueError naming
    the valid choices, or the package a choice needs when it is missing.
    """
    by_lower = {k.lower(): k for k in SAMPLERS}
    key = by_lower.get(str(name).strip().lower())
    if key is None:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    info = SAMPLERS[key]
    if schedule is not None:
        sched = schedule_key(schedule)
        if sched != "automatic":
            info = info._replace(schedule=sched)
    _check_available(info)
    return info
