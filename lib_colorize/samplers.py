"""Samplers over a denoiser ``D(x, sigma, **extra) -> x0`` (method §9), in k-diffusion's style.

Every sampler has the signature ``sample_*(model, x, sigmas, extra_args=None, callback=None, interrupt=None,
...) -> x`` where

* ``model(x, sigma, **extra_args)`` returns the denoised ``x0``; ``sigma`` is passed as a float32 (B,) tensor,
* ``x`` is the starting latent in sigma space (``initial_noise`` already multiplied by ``sigmas[0]``),
* ``sigmas`` is a descending 1-D schedule ending in 0 (from :mod:`lib_colorize.schedule`); there are
  ``len(sigmas) - 1`` steps and one model call per step,
* ``callback(step, total, x, denoised)`` runs after each step, ``step`` = 0-based index of the step just done,
  ``total = len(sigmas) - 1``, ``x`` = the updated latent, ``denoised`` = the model output of that step,
* ``interrupt()`` is checked before each model call; when it returns True :class:`SamplingInterrupted` is
  raised, carrying the latent and last ``denoised`` reached so far.

Randomness (ancestral / SDE samplers) comes only from ``noise_sampler(sigma, sigma_next) -> unit Gaussian like
x`` or, when none is given, from ``generator``: a ``torch.Generator`` or one generator per batch row (see
:func:`seeded_generators`), so results are reproducible and a row does not depend on the batch size.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .schedule import append_dims

__all__ = [
    "SamplingInterrupted", "GeneratorArg", "NoiseSampler", "Callback",
    "seeded_generators", "randn_rows", "default_noise_sampler", "initial_noise", "noise_to_sigma",
    "to_d", "get_ancestral_step",
    "sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_ddim",
    "SamplerInfo", "SAMPLERS", "SCHEDULES", "STOCHASTIC_SAMPLERS", "get_sampler",
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


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> Tuple[float, float]:
    """Split an ancestral step ``sigma_from -> sigma_to`` into a deterministic step to ``sigma_down`` plus fresh
    noise of std ``sigma_up``: ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) /
    sigma_from^2))``, ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


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
        if self.interrupt is not None and self.interrupt():
            raise SamplingInterrupted(i, self.total, x, self.last_denoised)
        denoised = self.model(x, self.sigmas[i] * self.s_in, **self.extra_args)
        self.last_denoised = denoised
        return denoised

    def done(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i, self.total, x, denoised)


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
def sample_dpmpp_2m_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                        callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                        generator: GeneratorArg = None, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``), ``lambda = -log sigma``, ``h = lambda_{i+1} -
    lambda_i``, ``eta_h = eta h``:

    ``x = (sigma_{i+1}/sigma_i) e^{-eta_h} x_i + (1 - e^{-h-eta_h}) D_i``;
    from the second step, with ``r = h_{i-1}/h``: midpoint ``x += 1/2 (1 - e^{-h-eta_h}) (D_i - D_{i-1}) / r``,
    heun ``x += ((1 - e^{-h-eta_h})/(-h-eta_h) + 1) (D_i - D_{i-1}) / r``;
    then ``x += sigma_{i+1} sqrt(1 - e^{-2 eta_h}) s_noise z``. The step to sigma 0 returns ``D_i``.

    The default noise is per-step Gaussian from ``generator`` (k-diffusion uses a Brownian tree).
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
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[Dict] = None,
                callback: Optional[Callback] = None, interrupt: Optional[Interrupt] = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), written in sigma space.

    The DDIM update ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` on the VP latent ``x_vp = sqrt(a) x``
    (``a = 1/(sigma^2+1)``, ``eps = (x - x0)/sigma``) becomes, after dividing by ``sqrt(a_prev)``,
    ``x_{i+1} = x0 + sigma_{i+1} eps = D_i + (sigma_{i+1}/sigma_i)(x_i - D_i)``, which is exactly one Euler step
    in sigma. Use it with the 'ddim' schedule (``NoiseSchedule.get_sigmas_ddim``: the uniform timesteps
    ``range(0, 1000, 1000 // n) + 1``, descending, then 0) to get DDIM; with another schedule it is Euler on that
    schedule.
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

class SamplerInfo(NamedTuple):
    """A sampler function and the sigma schedule key it uses for the webui's "Automatic" scheduler."""
    func: Callable[..., torch.Tensor]
    schedule: str


#: webui sampler name -> (function, default schedule key of :meth:`NoiseSchedule.get_sigmas`).
SAMPLERS: Dict[str, SamplerInfo] = {
    "Euler": SamplerInfo(sample_euler, "automatic"),
    "Euler a": SamplerInfo(sample_euler_ancestral, "automatic"),
    "DPM++ 2M": SamplerInfo(sample_dpmpp_2m, "karras"),
    "DPM++ 2M SDE": SamplerInfo(sample_dpmpp_2m_sde, "karras"),
    "DDIM": SamplerInfo(sample_ddim, "ddim"),
}

#: webui scheduler names. "Automatic" = the sampler's default from :data:`SAMPLERS`.
SCHEDULES: Tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential")

#: Samplers that draw noise (take ``generator`` / ``noise_sampler``).
STOCHASTIC_SAMPLERS = frozenset({"Euler a", "DPM++ 2M SDE"})


def get_sampler(name: str, schedule: Optional[str] = None) -> SamplerInfo:
    """Resolve a webui sampler name and scheduler name (case-insensitive) to ``(func, schedule_key)``.

    ``schedule`` None or "Automatic" gives the sampler's default ('automatic' = uniform, 'karras' or 'ddim');
    otherwise the lower-cased scheduler name ("uniform", "karras", "exponential"). DDIM with an explicit
    scheduler is Euler on that schedule (see :func:`sample_ddim`). Raises ValueError naming the valid choices.
    """
    by_lower = {k.lower(): k for k in SAMPLERS}
    key = by_lower.get(str(name).strip().lower())
    if key is None:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    info = SAMPLERS[key]
    if schedule is None or str(schedule).strip().lower() == "automatic":
        return info
    sched = str(schedule).strip().lower()
    if sched not in {s.lower() for s in SCHEDULES}:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    return SamplerInfo(info.func, sched)
