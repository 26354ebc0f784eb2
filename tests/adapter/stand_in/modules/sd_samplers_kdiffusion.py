"""Stand-in ``modules.sd_samplers_kdiffusion``: the webui's k-diffusion samplers over PyPI's k-diffusion.

``samplers_k_diffusion`` lists (label, k-diffusion function name, aliases, options) as the webui v1.10.1 does, for
the samplers the tests use (``tests/adapter/test_stand_in.py`` checks each entry against the real list when
``CD_WEBUI_DIR`` is set). ``CFGDenoiserKDiffusion.inner_model`` is ``k_diffusion.external.CompVisDenoiser`` (or
``CompVisVDenoiser`` for v-prediction) over the loaded model, quantized by ``enable_quantization``.
``KDiffusionSampler.get_sigmas`` resolves the schedule as the webui: the ``Schedule type`` (``p.scheduler``, or
``p.hr_scheduler`` in the hires pass), "Automatic" meaning the sampler's ``scheduler`` option, between the model's
sigma_min and sigma_max; ``discard_next_to_last_sigma`` samples one step more and drops the penultimate sigma.
``sample`` / ``sample_img2img`` pass ``sigmas``, the SDE samplers' Brownian ``noise_sampler`` and ``solver_type``
by the function's signature, and call ``func(model_wrap_cfg, x, extra_args=..., disable=False,
callback=callback_state, ...)``.
"""
import inspect

import k_diffusion.external
import k_diffusion.sampling
import torch

from modules import devices, sd_samplers_cfg_denoiser, sd_samplers_common, sd_schedulers, shared

samplers_k_diffusion = [
    ('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {'scheduler': 'karras'}),
    ('DPM++ SDE', 'sample_dpmpp_sde', ['k_dpmpp_sde'], {'scheduler': 'karras', "second_order": True,
                                                        "brownian_noise": True}),
    ('DPM++ 2M SDE', 'sample_dpmpp_2m_sde', ['k_dpmpp_2m_sde'], {'scheduler': 'exponential',
                                                                 "brownian_noise": True}),
    ('DPM++ 2M SDE Heun', 'sample_dpmpp_2m_sde', ['k_dpmpp_2m_sde_heun'], {'scheduler': 'exponential',
                                                                           "brownian_noise": True,
                                                                           "solver_type": "heun"}),
    ('DPM++ 3M SDE', 'sample_dpmpp_3m_sde', ['k_dpmpp_3m_sde'], {'scheduler': 'exponential',
                                                                 'discard_next_to_last_sigma': True,
                                                                 "brownian_noise": True}),
    ('Euler a', 'sample_euler_ancestral', ['k_euler_a', 'k_euler_ancestral'], {"uses_ensd": True}),
    ('Euler', 'sample_euler', ['k_euler'], {}),
    ('LMS', 'sample_lms', ['k_lms'], {}),
    ('Heun', 'sample_heun', ['k_heun'], {"second_order": True}),
    ('DPM2', 'sample_dpm_2', ['k_dpm_2'], {'scheduler': 'karras', 'discard_next_to_last_sigma': True,
                                           "second_order": True}),
    ('DPM2 a', 'sample_dpm_2_ancestral', ['k_dpm_2_a'], {'scheduler': 'karras', 'discard_next_to_last_sigma': True,
                                                         "uses_ensd": True, "second_order": True}),
]

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model),
                                   aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
    if hasattr(k_diffusion.sampling, funcname)
]

sampler_extra_params = {
    'sample_euler': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
    'sample_heun': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
    'sample_dpm_2': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
    'sample_dpm_2_ancestral': ['s_noise'],
    'sample_dpmpp_sde': ['s_noise'],
    'sample_dpmpp_2m_sde': ['s_noise'],
    'sample_dpmpp_3m_sde': ['s_noise'],
}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser = (k_diffusion.external.CompVisVDenoiser if shared.sd_model.parameterization == "v"
                        else k_diffusion.external.CompVisDenoiser)
            self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.extra_params = sampler_extra_params.get(funcname, [])
        self.options = options or {}
        self.func = getattr(k_diffusion.sampling, self.funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        discard_next_to_last_sigma = self.discard_next_to_last_sigma(p)
        steps += 1 if discard_next_to_last_sigma else 0

        scheduler_name = (p.hr_scheduler if p.is_hr_pass else p.scheduler) or 'Automatic'
        if scheduler_name == 'Automatic':
            scheduler_name = self.config.options.get('scheduler', None)
        scheduler = sd_schedulers.schedulers_map.get(scheduler_name)

        sigma_min, sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
        if scheduler is None or scheduler.function is None:
            sigmas = self.model_wrap.get_sigmas(steps)
        else:
            sigmas_kwargs = {'sigma_min': sigma_min, 'sigma_max': sigma_max}
            if scheduler.label != 'Automatic' and not p.is_hr_pass:
                p.extra_generation_params["Schedule type"] = scheduler.label
            if scheduler.need_inner_model:
                sigmas_kwargs['inner_model'] = self.model_wrap
            sigmas = scheduler.function(n=steps, **sigmas_kwargs, device=devices.cpu)

        if discard_next_to_last_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def _options_kwargs(self, x, sigmas, p, extra_params_kwargs):
        if self.config.options.get('brownian_noise', False):
            extra_params_kwargs['noise_sampler'] = self.create_noise_sampler(x, sigmas, p)
        if self.config.options.get('solver_type', None) == 'heun':
            extra_params_kwargs['solver_type'] = 'heun'
        return extra_params_kwargs

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]

        extra_params_kwargs = self.initialize(p)
        if 'sigmas' in inspect.signature(self.func).parameters:
            extra_params_kwargs['sigmas'] = sigma_sched
        self._options_kwargs(x, sigmas, p, extra_params_kwargs)

        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        return self.run_sampler(p, xi, t_enc + 1, conditioning, unconditional_conditioning, image_conditioning,
                                extra_params_kwargs)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]

        extra_params_kwargs = self.initialize(p)
        if 'sigmas' in inspect.signature(self.func).parameters:
            extra_params_kwargs['sigmas'] = sigmas
        self._options_kwargs(x, sigmas, p, extra_params_kwargs)

        self.last_latent = x
        return self.run_sampler(p, x, steps, conditioning, unconditional_conditioning, image_conditioning,
                                extra_params_kwargs)
