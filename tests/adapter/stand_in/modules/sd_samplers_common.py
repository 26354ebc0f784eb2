"""Stand-in ``modules.sd_samplers_common``: the sampler base, ``TorchHijack`` and the webui's noise plumbing.

As in the webui: ``initialize(p)`` arms the ``CFGDenoiser`` and replaces ``k_diffusion.sampling.torch`` with a
``TorchHijack`` whose ``randn_like`` is ``p.rng.next()`` (so ancestral noise is per image seed); SDE samplers get a
``BrownianTreeNoiseSampler`` seeded with the batch's image seeds, and torchsde's Brownian ``_randn`` is replaced by
``devices.randn_local`` at import; ``launch_sampling`` returns the last latent on ``InterruptedException``;
``callback_state`` takes k-diffusion's callback dict. Left out: live previews, the churn/tmin/tmax/noise settings
(their defaults are k-diffusion's), the refiner.
"""
import inspect
from collections import namedtuple

import k_diffusion.sampling
import torch

from modules import devices, rng, shared  # noqa: F401  (rng installs devices.randn_local)
from modules.shared import opts, state

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


stored_latents = []


def store_latent(decoded):
    state.current_latent = decoded
    stored_latents.append(decoded)


class InterruptedException(BaseException):
    pass


def replace_torchsde_browinan():
    import torchsde._brownian.brownian_interval

    def torchsde_randn(size, dtype, device, seed):
        return devices.randn_local(seed, size).to(device=device, dtype=dtype)

    torchsde._brownian.brownian_interval._randn = torchsde_randn


replace_torchsde_browinan()


class TorchHijack:
    """``torch`` for k-diffusion's sampling module, with ``randn_like`` drawing from the image RNG."""

    def __init__(self, p):
        self.rng = p.rng

    def __getattr__(self, item):
        if item == "randn_like":
            return self.randn_like
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def randn_like(self, x):
        return self.rng.next()


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.stop_at = None
        self.eta = None
        self.config: SamplerData = None  # set by sd_samplers.create_sampler
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float("inf")
        self.s_noise = 1.0
        self.eta_option_field = "eta_ancestral"
        self.eta_infotext_field = "Eta"
        self.eta_default = 1.0
        self.conditioning_key = getattr(shared.sd_model.model, "conditioning_key", "crossattn")
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options = {}

    def callback_state(self, d):
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p) -> dict:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)

        k_diffusion.sampling.torch = TorchHijack(p)

        parameters = inspect.signature(self.func).parameters
        extra_params_kwargs = {name: getattr(p, name) for name in self.extra_params
                               if hasattr(p, name) and name in parameters}
        if "eta" in parameters:
            if self.eta != self.eta_default:
                p.extra_generation_params[self.eta_infotext_field] = self.eta
            extra_params_kwargs["eta"] = self.eta
        return extra_params_kwargs

    def discard_next_to_last_sigma(self, p) -> bool:
        """The sampler's option, or the ``always_discard_next_to_last_sigma`` setting (then noted in the infotext)."""
        discard = self.config is not None and self.config.options.get('discard_next_to_last_sigma', False)
        if opts.always_discard_next_to_last_sigma and not discard:
            discard = True
            p.extra_generation_params["Discard penultimate sigma"] = True
        return discard

    def run_sampler(self, p, x, steps, conditioning, unconditional_conditioning, image_conditioning,
                    extra_params_kwargs):
        """``func(model_wrap_cfg, x, extra_args=..., disable=False, callback=callback_state, ...)`` over ``steps``."""
        self.sampler_extra_args = {'cond': conditioning, 'image_cond': image_conditioning,
                                   'uncond': unconditional_conditioning, 'cond_scale': p.cfg_scale,
                                   's_min_uncond': self.s_min_uncond}
        samples = self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra_params_kwargs))
        self.add_infotext(p)
        return samples

    def create_noise_sampler(self, x, sigmas, p):
        """SDE samplers: a Brownian tree per image seed, so a batch gives the images made one by one."""
        if shared.opts.no_dpmpp_sde_batch_determinism:
            return None
        from k_diffusion.sampling import BrownianTreeNoiseSampler

        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        current_iter_seeds = p.all_seeds[p.iteration * p.batch_size:(p.iteration + 1) * p.batch_size]
        return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=current_iter_seeds)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        raise NotImplementedError()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        raise NotImplementedError()

    def add_infotext(self, p):
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
