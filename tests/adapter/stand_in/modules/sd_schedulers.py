"""Stand-in ``modules.sd_schedulers``: the webui's "Schedule type" table (the entries the tests use).

Importing it replaces ``k_diffusion.sampling.to_d`` by ``(x - denoised) / sigma`` (no ``append_dims``), as the
webui does. ``Automatic`` means the sampler's own ``scheduler`` option, or the model's ``get_sigmas`` (uniform in
t) when it has none.
"""
import dataclasses

import k_diffusion.sampling
import torch


def to_d(x, sigma, denoised):
    """Converts a denoiser output to a Karras ODE derivative."""
    return (x - denoised) / sigma


k_diffusion.sampling.to_d = to_d


@dataclasses.dataclass
class Scheduler:
    name: str
    label: str
    function: any
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: list = None


def uniform(n, sigma_min, sigma_max, inner_model, device):
    return inner_model.get_sigmas(n).to(device)


def sgm_uniform(n, sigma_min, sigma_max, inner_model, device):
    """``n`` sigmas at timesteps evenly spaced from t(sigma_max) down to t(sigma_min), the last dropped, then 0."""
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigmas = [inner_model.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor(sigmas + [0.0]).to(device)


def ddim_scheduler(n, sigma_min, sigma_max, inner_model, device):
    """The table sigmas at t = 1, 1 + T//n, 1 + 2 T//n, ... (descending), then 0."""
    step = max(len(inner_model.sigmas) // n, 1)
    sigmas = [float(inner_model.sigmas[t]) for t in range(1, len(inner_model.sigmas), step)][::-1]
    return torch.FloatTensor(sigmas + [0.0]).to(device)


schedulers = [
    Scheduler("automatic", "Automatic", None),
    Scheduler("uniform", "Uniform", uniform, need_inner_model=True),
    Scheduler("karras", "Karras", k_diffusion.sampling.get_sigmas_karras, default_rho=7.0),
    Scheduler("exponential", "Exponential", k_diffusion.sampling.get_sigmas_exponential),
    Scheduler("sgm_uniform", "SGM Uniform", sgm_uniform, need_inner_model=True, aliases=["SGMUniform"]),
    Scheduler("ddim", "DDIM", ddim_scheduler, need_inner_model=True),
]

schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
