"""The SD "scaled-linear" noise schedule, sigma <-> timestep conversion, sigma schedules and denoiser wrappers.

Conventions (method §1.1, §9, §11), the same as k-diffusion:

* Discrete DDPM schedule, ``T = 1000`` steps:
  ``beta_i = (sqrt(0.00085) + i * (sqrt(0.012) - sqrt(0.00085)) / 999)^2``, ``i = 0..999``,
  ``alphas_cumprod_i = prod_{j<=i} (1 - beta_j)`` (computed in float64, stored in float32 as ldm does),
  ``sigma_i = sqrt((1 - alphas_cumprod_i) / alphas_cumprod_i)`` (float32).
  ``sigma_min = sigma_0 = 0.0291675``, ``sigma_max = sigma_999 = 14.614642``.
* Samplers work in "sigma space" (variance exploding): ``x = x0 + sigma * eps``. The U-Net sees the
  variance-preserving input ``x * c_in`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` and a fractional timestep
  ``t = sigma_to_t(sigma)``.
* A denoiser is ``D(x, sigma, **extra) -> x0`` (the prediction of the clean latent).

Nothing here imports the webui.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "NUM_TIMESTEPS", "LINEAR_START", "LINEAR_END", "SCHEDULE_KEYS", "SCHEDULE_LABELS", "SAMPLER_STEPS",
    "schedule_key",
    "scaled_linear_betas", "alphas_cumprod_from_betas", "append_zero", "append_dims",
    "NoiseSchedule", "default_schedule",
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_kl_optimal",
    "get_sigmas_align_your_steps", "get_sigmas_beta", "ALIGN_YOUR_STEPS_SIGMAS", "discard_penultimate_sigma",
    "ddim_timesteps",
    "eps_to_x0", "v_to_x0", "x0_to_eps", "get_scalings",
    "Denoiser", "make_denoiser",
]

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012

#: The webui's "Schedule type" table (``modules/sd_schedulers.py`` of v1.10.1), key -> label, in its order.
#: "automatic" is the same as "uniform" here; the sampler registry resolves the webui's "Automatic" to the
#: sampler's own default before it gets here.
SCHEDULE_LABELS: Dict[str, str] = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM", "beta": "Beta",
}
#: Other names the webui accepts for a schedule (its ``aliases``).
SCHEDULE_ALIASES: Dict[str, str] = {"sgmuniform": "sgm_uniform"}
#: Steps of a sampler of its own, not a schedule type: the DDIM sampler's timesteps.
SAMPLER_STEPS = ("ddim_timesteps",)
#: Keys accepted by :meth:`NoiseSchedule.get_sigmas` (labels and aliases are accepted too, see :func:`schedule_key`).
SCHEDULE_KEYS = tuple(SCHEDULE_LABELS) + SAMPLER_STEPS


def schedule_key(name: str) -> str:
    """The key of a schedule given by key, label or alias, case-insensitive ("SGM Uniform", "sgm_uniform" and
    "SGMUniform" all give "sgm_uniform"). Raises ValueError naming the labels."""
    wanted = str(name).strip().lower()
    for key, label in SCHEDULE_LABELS.items():
        if wanted in (key, label.lower()):
            return key
    if wanted in SCHEDULE_ALIASES:
        return SCHEDULE_ALIASES[wanted]
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_LABELS.values())}")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------

def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Appends a trailing 0 to a 1-D tensor (the final "clean" sigma)."""
    return torch.cat([x, x.new_zeros([1])])


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Appends singleton dimensions to ``x`` until it has ``target_dims`` dimensions (for per-row scalars)."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _as_tensor(value: Any, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# The discrete schedule
# ----------------------------------------------------------------------------------------------------------------

def scaled_linear_betas(num_timesteps: int = NUM_TIMESTEPS, linear_start: float = LINEAR_START,
                        linear_end: float = LINEAR_END) -> torch.Tensor:
    """SD scaled-linear betas in float64: ``beta_i = (sqrt(start) + i (sqrt(end) - sqrt(start)) / (T-1))^2``.

    ldm's ``make_beta_schedule("linear")`` (mid-2024 name) / ``"scaled_linear"`` (ea039d5 name), method §1.1.
    """
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod_i = prod_{j<=i} (1 - beta_j)``, accumulated in float64 and returned in float32 (as ldm
    registers its buffer)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0).to(torch.float32)


def ldm_schedule_buffers(num_timesteps: int = NUM_TIMESTEPS, linear_start: float = LINEAR_START,
                         linear_end: float = LINEAR_END) -> Dict[str, torch.Tensor]:
    """The buffers ldm's ``LatentDiffusion.register_schedule`` persists, for the scaled-linear schedule (method
    §1.1), in float64: what a checkpoint carries (and what the webui needs when a file lacks them)."""
    betas = scaled_linear_betas(num_timesteps, linear_start, linear_end)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }


def noised_reference(latent: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     sigmas: torch.Tensor) -> torch.Tensor:
    """Attention injection's reference at this call's noise level, as a k-diffusion input (method §6.2).

    The original noises the reference at the integer timestep ``n = round(t)``:
    ``q(r, n) = √ᾱ_n r + √(1 - ᾱ_n) ε``. A k-diffusion model divides its input by ``√(σ² + 1)`` (``c_in``), so
    the input that reaches the U-Net as ``q(r, n)`` is ``x = √((σ² + 1) / (σ_n² + 1)) (r + σ_n ε)`` with
    ``σ_n = sigmas[n] = √((1 - ᾱ_n) / ᾱ_n)``; at integer ``t`` that is ``r + σ ε``. ``t`` is the call's
    (fractional) timestep, ``sigmas`` the model's discrete table (``sigmas[0]`` at t = 0).
    """
    table = sigmas.to(device=latent.device, dtype=torch.float32)
    n = t.reshape(-1)[:1].to(table.device).round().long().clamp(0, table.shape[0] - 1)
    sigma_n = table[n].view(-1, 1, 1, 1)
    s = sigma.reshape(-1)[:1].to(device=latent.device, dtype=torch.float32).view(-1, 1, 1, 1)
    scale = ((s * s + 1) / (sigma_n * sigma_n + 1)).sqrt()
    return (scale * (latent.float() + sigma_n * noise.float())).to(latent.dtype)


class NoiseSchedule:
    """A discrete DDPM schedule seen in sigma space, like k-diffusion's ``DiscreteSchedule``.

    ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` (float32, increasing in t);
    ``log_sigmas = log(sigmas)``. Timesteps between integers are defined by linear interpolation of log sigma.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self._device_cache: Dict[Tuple[str, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def scaled_linear(cls, num_timesteps: int = NUM_TIMESTEPS, linear_start: float = LINEAR_START,
                      linear_end: float = LINEAR_END) -> "NoiseSchedule":
        """The SD / ColorizeDiffusion schedule (method §1.1)."""
        return cls(alphas_cumprod_from_betas(scaled_linear_betas(num_timesteps, linear_start, linear_end)))

    # -- basic properties ------------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def t_max(self) -> int:
        return self.num_timesteps - 1

    @property
    def sigma_min(self) -> float:
        """``sigmas[0]`` (0.0291675 for SD)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """``sigmas[-1]`` (14.614642 for SD)."""
        return float(self.sigmas[-1])

    def _on(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, log_sigmas) on ``device``, cached so that GPU sampling does not copy them every step."""
        key = (str(device), torch.float32)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = (self.sigmas.to(device), self.log_sigmas.to(device))
            self._device_cache[key] = cached
        return cached

    # -- sigma <-> t ----------------------------------------------------------------------------------------

    def sigma_to_t(self, sigma: Any, quantize: bool = False) -> torch.Tensor:
        """Fractional timestep of ``sigma`` (k-diffusion ``DiscreteSchedule.sigma_to_t``).

        With ``low`` the last index whose ``log_sigmas[low] <= log(sigma)`` (clamped to ``T-2``), ``high = low+1``:
        ``w = clamp((log_sigmas[low] - log sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)``,
        ``t = (1 - w) low + w high``. Sigmas outside ``[sigma_min, sigma_max]`` clamp to ``t in [0, T-1]``.
        ``quantize=True`` returns the nearest integer timestep instead. Returns float32 with ``sigma``'s shape.
        """
        sigma = _as_tensor(sigma)
        _, log_sigmas = self._on(sigma.device)
        log_sigma = sigma.to(torch.float32).log()
        dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape).to(torch.float32)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma.reshape(-1)) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: Any) -> torch.Tensor:
        """Sigma of a (fractional) timestep: ``exp((1 - frac t) log_sigmas[floor t] + frac t * log_sigmas[ceil t])``
        (k-diffusion ``DiscreteSchedule.t_to_sigma``). Returns float32 with ``t``'s shape."""
        t = _as_tensor(t).to(torch.float32)
        _, log_sigmas = self._on(t.device)
        t = t.clamp(0, self.t_max)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
        return log_sigma.exp()

    # -- sigma schedules ------------------------------------------------------------------------------------

    def get_sigmas_uniform(self, n: int) -> torch.Tensor:
        """k-diffusion ``get_sigmas(n)``: ``sigma(t)`` for ``t = linspace(T-1, 0, n)``, then a trailing 0.

        This is the webui's "Uniform" scheduler and the "Automatic" one of samplers without a preferred schedule.
        """
        _check_steps(n)
        t = torch.linspace(self.t_max, 0, n, dtype=torch.float32)
        return append_zero(self.t_to_sigma(t))

    def get_sigmas_karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. (2022) schedule between this model's ``sigma_max`` and ``sigma_min`` (see
        :func:`get_sigmas_karras`)."""
        return get_sigmas_karras(n, self.sigma_min, self.sigma_max, rho=rho)

    def get_sigmas_exponential(self, n: int) -> torch.Tensor:
        """Log-linear schedule between this model's ``sigma_max`` and ``sigma_min`` (see
        :func:`get_sigmas_exponential`)."""
        return get_sigmas_exponential(n, self.sigma_min, self.sigma_max)

    def get_sigmas_ddim_timesteps(self, n: int) -> torch.Tensor:
        """The DDIM sampler's own steps: the timesteps of :func:`ddim_timesteps` as sigmas, descending, then a
        trailing 0 (the webui's DDIM is a timesteps sampler and ignores the schedule type).

        ``sigmas = [sigma_{t_k}, ..., sigma_{t_0}, 0]`` with ``t_k = k * (T // n) + 1``. These are exact table
        entries (``sigma_to_t`` maps them back to the integer timesteps). The number of steps is
        ``len(range(0, T, T // n))``: ``n`` when ``n`` divides 1000, a few more otherwise (30 -> 31), as in
        ldm's DDIM. The final step goes from ``t = 1`` to sigma 0, i.e. ``alpha_prev = 1`` (ldm uses
        ``alphas_cumprod[0]`` and leaves ``sigma_0 = 0.029`` of noise; the webui stops at ``t = 1`` without
        evaluating it).
        """
        timesteps = ddim_timesteps(n, self.num_timesteps)
        return append_zero(self.sigmas[timesteps.flip(0)])

    def get_sigmas_ddim(self, n: int) -> torch.Tensor:
        """The webui's "DDIM" schedule type for the k-diffusion samplers: the table sigmas at ``t = 1, 1 + s,
        1 + 2s, ... < T`` with ``s = max(T // n, 1)``, descending, then a trailing 0. The same timesteps as
        :meth:`get_sigmas_ddim_timesteps` except when ``s`` divides ``T - 1`` (n = 3, 9, 27, 37, ...), where the
        DDIM sampler also has ``t = 999``."""
        _check_steps(n)
        stride = max(self.num_timesteps // int(n), 1)
        return append_zero(self.sigmas[list(range(1, self.num_timesteps, stride))[::-1]])

    def get_sigmas_polyexponential(self, n: int, rho: float = 1.0) -> torch.Tensor:
        """Polynomial in log sigma between this model's ``sigma_max`` and ``sigma_min`` (see
        :func:`get_sigmas_polyexponential`)."""
        return get_sigmas_polyexponential(n, self.sigma_min, self.sigma_max, rho=rho)

    def get_sigmas_sgm_uniform(self, n: int) -> torch.Tensor:
        """The webui's "SGM Uniform": ``sigma(t)`` for the first ``n`` of ``linspace(t(sigma_max), t(sigma_min),
        n + 1)``, then a trailing 0 (the uniform timesteps of SGM's discretization, which never reach t = 0)."""
        _check_steps(n)
        t = torch.linspace(float(self.sigma_to_t(self.sigma_max)), float(self.sigma_to_t(self.sigma_min)), n + 1)
        return append_zero(self.t_to_sigma(t[:-1]))

    def get_sigmas_normal(self, n: int) -> torch.Tensor:
        """The webui's "Normal": ``sigma(t)`` for ``t = linspace(t(sigma_max), t(sigma_min), n)``, then a trailing 0
        (on this table the same timesteps as "Uniform", reached through ``sigma_to_t``)."""
        _check_steps(n)
        t = torch.linspace(float(self.sigma_to_t(self.sigma_max)), float(self.sigma_to_t(self.sigma_min)), n)
        return append_zero(self.t_to_sigma(t))

    def get_sigmas_simple(self, n: int) -> torch.Tensor:
        """The webui's "Simple": every ``T/n``-th table sigma from the top, ``sigma_k = sigmas[T - 1 - floor(k T/n)]``
        for ``k = 0..n-1``, then a trailing 0."""
        _check_steps(n)
        stride = self.num_timesteps / n
        indices = [self.t_max - int(k * stride) for k in range(int(n))]
        return append_zero(self.sigmas[indices])

    def get_sigmas_kl_optimal(self, n: int) -> torch.Tensor:
        """KL-optimal steps between this model's ``sigma_max`` and ``sigma_min`` (see :func:`get_sigmas_kl_optimal`;
        no trailing 0)."""
        return get_sigmas_kl_optimal(n, self.sigma_min, self.sigma_max)

    def get_sigmas_align_your_steps(self, n: int) -> torch.Tensor:
        """Align Your Steps for SD 1.5-family models (see :func:`get_sigmas_align_your_steps`)."""
        return get_sigmas_align_your_steps(n)

    def get_sigmas_beta(self, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
        """Beta-distributed steps between this model's ``sigma_max`` and ``sigma_min`` (see
        :func:`get_sigmas_beta`)."""
        return get_sigmas_beta(n, self.sigma_min, self.sigma_max, alpha=alpha, beta=beta)

    def get_sigmas(self, n: int, kind: str = "uniform") -> torch.Tensor:
        """Sigma schedule by key, label or alias (case-insensitive, see :data:`SCHEDULE_LABELS`): 'automatic' (=
        'uniform'), 'karras', 'exponential', 'polyexponential', 'sgm_uniform', 'kl_optimal', 'align_your_steps',
        'simple', 'normal', 'ddim', 'beta'; each as the webui v1.10.1 builds it from this model's sigma range.

        Also 'ddim_timesteps', the DDIM sampler's own steps. Returns a float32 CPU tensor of descending sigmas,
        ``n + 1`` entries ending in 0, except 'ddim' and 'ddim_timesteps' (see :meth:`get_sigmas_ddim`,
        :meth:`get_sigmas_ddim_timesteps`) and 'kl_optimal', which ends at ``sigma_min`` as in the webui.
        """
        key = kind if kind in SAMPLER_STEPS else schedule_key(kind)
        method = "get_sigmas_uniform" if key == "automatic" else f"get_sigmas_{key}"
        return getattr(self, method)(n)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, sigma_min={self.sigma_min:.7g}, "
                f"sigma_max={self.sigma_max:.8g})")


_DEFAULT: Optional[NoiseSchedule] = None


def default_schedule() -> NoiseSchedule:
    """The shared SD scaled-linear schedule (built once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = NoiseSchedule.scaled_linear()
    return _DEFAULT


def _check_steps(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..n-1``, then a trailing 0 (for ``n = 1``: ``[sigma_max, 0]``)."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``sigma_i = exp(linspace(log sigma_max, log sigma_min, n))_i``, then a trailing 0."""
    _check_steps(n)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float32).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Polynomial in log sigma (k-diffusion ``get_sigmas_polyexponential``): with ``r_i = (1 - i/(n-1))^rho``,
    ``sigma_i = exp(log sigma_min + r_i (log sigma_max - log sigma_min))``, then a trailing 0. ``rho = 1`` is the
    exponential schedule."""
    _check_steps(n)
    ramp = torch.linspace(1, 0, n, dtype=torch.float32) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour, Fidler & Kreis 2024, "Align Your Steps", arXiv 2404.14507: the steps that
    minimise their KL-divergence bound, evenly spaced in ``atan sigma``):
    ``sigma_k = tan((k/n) atan(sigma_min) + (1 - k/n) atan(sigma_max))``, ``k = 0..n``.

    As the webui's "KL Optimal" this has ``n + 1`` entries and ends at ``sigma_min``, not 0: the last step
    leaves ``sigma_min`` of noise.
    """
    _check_steps(n)
    alpha_min = torch.arctan(torch.tensor(sigma_min, dtype=torch.float32))
    alpha_max = torch.arctan(torch.tensor(sigma_max, dtype=torch.float32))
    k = torch.arange(int(n) + 1) / n
    return torch.tan(k * alpha_min + (1.0 - k) * alpha_max)


#: The published Align Your Steps noise levels (Sabour, Fidler & Kreis 2024, NVIDIA's "how to" page; 11 sigmas
#: from sigma_max down to sigma_min), as the webui v1.10.1 uses them: SD 1.5 (every model that is not SDXL) and SDXL.
ALIGN_YOUR_STEPS_SIGMAS: Dict[str, Tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def get_sigmas_align_your_steps(n: int, family: str = "sd15") -> torch.Tensor:
    """Align Your Steps (Sabour, Fidler & Kreis 2024), as the webui's "Align Your Steps": for ``n = 11`` the
    published sigmas of ``family`` themselves; otherwise ``n`` sigmas log-linearly interpolated through them
    (``log sigma`` read off the published curve at ``n`` evenly spaced points); then a trailing 0. (The webui
    compares ``n`` with the length of the table, 11, so its 10-step schedule is an interpolated one.)"""
    _check_steps(n)
    published = ALIGN_YOUR_STEPS_SIGMAS[family]
    if n == len(published):
        return torch.tensor(published + (0.0,), dtype=torch.float32)
    log_ascending = np.log(np.asarray(published[::-1], dtype=np.float64))
    grid = np.linspace(0, 1, len(published))
    sigmas = np.exp(np.interp(np.linspace(0, 1, int(n)), grid, log_ascending))[::-1]
    return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32)


def get_sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6,
                    beta: float = 0.6) -> torch.Tensor:
    """Beta sampling (Lee et al. 2024, "Beta Sampling is All You Need", arXiv 2407.12173), the webui's "Beta":
    ``u_i = F^{-1}_{Beta(alpha, beta)}(1 - i/(n-1))`` (the quantile function), ``sigma_i = sigma_min + u_i
    (sigma_max - sigma_min)``, then a trailing 0. Needs scipy (for the quantile function)."""
    _check_steps(n)
    try:
        from scipy import stats
    except ImportError:
        raise ImportError("the Beta schedule needs scipy (pip install scipy)") from None
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, int(n)), alpha, beta)
    sigmas = sigma_min + quantiles * (sigma_max - sigma_min)
    return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32)


def discard_penultimate_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """``[sigma_0, ..., sigma_{n-2}, sigma_n]``: drops the next-to-last sigma, as the webui does for the samplers
    flagged ``discard_next_to_last_sigma`` (DPM2, DPM2 a, DPM++ 3M SDE) after building one step more."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def ddim_timesteps(n: int, num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """Uniform DDIM timesteps, ascending: ``range(0, T, T // n) + 1`` clipped to ``[0, T-1]`` (ldm
    ``make_ddim_timesteps(..., "uniform")``, the webui's ``CompVisSampler.get_timesteps``). Duplicates
    (only possible for ``n`` near ``T``) are removed. Returns int64."""
    _check_steps(n)
    step = max(num_timesteps // int(n), 1)
    timesteps = torch.arange(0, num_timesteps, step, dtype=torch.int64) + 1
    return torch.unique(timesteps.clamp(0, num_timesteps - 1))


# ----------------------------------------------------------------------------------------------------------------
# Model outputs -> x0 (method §11)
# ----------------------------------------------------------------------------------------------------------------

def get_scalings(sigma: torch.Tensor, parameterization: str = "eps") -> Tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """``(c_skip, c_out, c_in)`` with ``D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma))``.

    * eps (CompVisDenoiser): ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``.
    * v (CompVisVDenoiser, sigma_data = 1): ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``,
      ``c_in = 1 / sqrt(sigma^2 + 1)``.
    """
    sigma = _as_tensor(sigma)
    c_in = 1 / (sigma ** 2 + 1) ** 0.5
    if parameterization == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if parameterization == "v":
        return 1 / (sigma ** 2 + 1), -sigma / (sigma ** 2 + 1) ** 0.5, c_in
    raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")


def eps_to_x0(x: torch.Tensor, sigma: Any, eps: torch.Tensor) -> torch.Tensor:
    """``x0 = x - sigma * eps`` for the sigma-space input ``x`` (not the ``c_in``-scaled U-Net input).
    ``sigma`` is a scalar or one value per batch row."""
    sigma = append_dims(_as_tensor(sigma, x), x.ndim)
    return x - sigma * eps


def v_to_x0(x: torch.Tensor, sigma: Any, v: torch.Tensor) -> torch.Tensor:
    """``x0 = c_skip x + c_out v`` with ``c_skip = 1/(sigma^2+1)``, ``c_out = -sigma/sqrt(sigma^2+1)``.

    Equivalent to the VP form ``x0 = sqrt(a) x_vp - sqrt(1-a) v`` with ``x_vp = x / sqrt(sigma^2+1)``,
    ``a = 1/(sigma^2+1)``.
    """
    sigma = append_dims(_as_tensor(sigma, x), x.ndim)
    c_skip, c_out, _ = get_scalings(sigma, "v")
    return c_skip * x + c_out * v


def x0_to_eps(x: torch.Tensor, sigma: Any, x0: torch.Tensor) -> torch.Tensor:
    """``eps = (x - x0) / sigma`` (the Karras ODE derivative ``d = dx/dsigma``); ``sigma`` must be > 0."""
    sigma = append_dims(_as_tensor(sigma, x), x.ndim)
    return (x - x0) / sigma


ModelFn = Callable[..., torch.Tensor]


class Denoiser:
    """``D(x, sigma, **kwargs) -> x0`` over a raw model ``model_fn(x_in, t, **kwargs) -> eps | v``.

    As k-diffusion's ``CompVisDenoiser`` (eps) / ``CompVisVDenoiser`` (v):
    ``x_in = c_in x``, ``t = schedule.sigma_to_t(sigma)`` (fractional, float32, one per batch row),
    ``D = c_skip x + c_out model_fn(x_in, t, **kwargs)`` with the scalings of :func:`get_scalings`.
    ``sigma`` may be a scalar or a (B,) tensor. ``quantize=True`` rounds ``t`` to the nearest integer timestep.
    """

    def __init__(self, model_fn: ModelFn, parameterization: str = "eps",
                 schedule: Optional[NoiseSchedule] = None, quantize: bool = False):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.model_fn = model_fn
        self.parameterization = parameterization
        self.schedule = schedule if schedule is not None else default_schedule()
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: Any) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def __call__(self, x: torch.Tensor, sigma: Any, **kwargs: Any) -> torch.Tensor:
        sigma = _as_tensor(sigma).to(x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = [append_dims(c, x.ndim).to(x.dtype) for c in
                               get_scalings(sigma.to(torch.float32), self.parameterization)]
        out = self.model_fn(x * c_in, self.sigma_to_t(sigma), **kwargs)
        if self.parameterization == "eps":
            return x + out * c_out
        return x * c_skip + out * c_out

    def __repr__(self) -> str:
        return f"Denoiser(parameterization={self.parameterization!r}, schedule={self.schedule!r})"


def make_denoiser(model_fn: ModelFn, parameterization: str = "eps",
                  schedule: Optional[NoiseSchedule] = None, quantize: bool = False) -> Denoiser:
    """Wraps ``model_fn(x_in, t, **kwargs) -> eps | v`` into ``D(x, sigma, **kwargs) -> x0`` (see
    :class:`Denoiser`)."""
    return Denoiser(model_fn, parameterization, schedule, quantize)
