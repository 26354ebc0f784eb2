"""Stand-in ``modules.sd_samplers_timesteps_impl``: the webui's DDIM and DDIM CFG++ loops.

``timesteps`` ascending (``[1, 1 + T//n, ...]`` from ``CompVisSampler.get_timesteps``); the loop evaluates them
from the last down to ``timesteps[1]``, ``len(timesteps) - 1`` model calls, each step going from
``a_t = alphas_cumprod[timesteps[i]]`` to ``a_prev = alphas_cumprod[timesteps[i - 1]]`` (``alphas_cumprod[0]``
for ``i = 0``, which the loop never reaches): ``x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)``,
``x <- sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) e + sigma_t z`` with
``sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))`` and ``z`` from k-diffusion's (hijacked)
``torch.randn_like``. The result stays at the noise level of ``timesteps[0] = 1``. CFG++ uses the unconditional
prediction for the direction term and divides the CFG scale by 12.5.
"""
import k_diffusion.sampling
import numpy as np
import torch

from modules.torch_utils import float64


def _schedule(model, x, timesteps, eta):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(float64(x))
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu())
                           * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
    return alphas, alphas_prev, torch.sqrt(1 - alphas), sigmas


def _ddim_loop(model, x, timesteps, extra_args, callback, eta, direction):
    alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = _schedule(model, x, timesteps, eta)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * direction(e_t)
        noise = sigma_t * k_diffusion.sampling.torch.randn_like(x)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    return _ddim_loop(model, x, timesteps, extra_args, callback, eta, lambda e_t: e_t)


@torch.no_grad()
def ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    model.cond_scale_miltiplier = 1 / 12.5
    model.need_last_noise_uncond = True
    return _ddim_loop(model, x, timesteps, extra_args, callback, eta, lambda e_t: model.last_noise_uncond)
