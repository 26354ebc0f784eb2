"""Stand-in ``modules.sd_samplers_timesteps``: the timestep samplers (DDIM, DDIM CFG++) as the webui runs them.

``sigma`` passed to the denoiser *is* the timestep and the output is eps; masks are blended before denoising
(webui-integration §2.1). ``CompVisSampler.get_timesteps`` is the webui's ``clip(range(0, 1000, 1000 // steps) + 1,
0, 999)`` (one more step with ``discard_next_to_last_sigma``); img2img noises ``x`` to ``timesteps[t_enc]`` and
samples ``timesteps[:t_enc]``.
"""
import inspect

import torch

from modules import devices, sd_samplers_cfg_denoiser, sd_samplers_common, sd_samplers_timesteps_impl, shared

samplers_timesteps = [
    ('DDIM', sd_samplers_timesteps_impl.ddim, ['ddim'], {}),
    ('DDIM CFG++', sd_samplers_timesteps_impl.ddim_cfgpp, ['ddim_cfgpp'], {}),
]

samplers_data_timesteps = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: CompVisSampler(funcname, model),
                                   aliases, options)
    for label, funcname, aliases, options in samplers_timesteps
]


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiser(torch.nn.Module):
    def __init__(self, model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_model = model

    def predict_eps_from_z_and_v(self, x_t, t, v):
        a = self.inner_model.alphas_cumprod[t.to(torch.int), None, None, None]
        return torch.sqrt(a) * v + torch.sqrt(1 - a) * x_t

    def forward(self, input, timesteps, **kwargs):
        return self.predict_eps_from_z_and_v(input, timesteps, self.inner_model.apply_model(input, timesteps,
                                                                                            **kwargs))


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        a_t = self.alphas[sigma.to(dtype=int)][:, None, None, None]
        return (x_in - (1 - a_t).sqrt() * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser = (CompVisTimestepsVDenoiser if shared.sd_model.parameterization == "v"
                        else CompVisTimestepsDenoiser)
            self.model_wrap = denoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.eta_option_field = 'eta_ddim'
        self.eta_infotext_field = 'Eta DDIM'
        self.eta_default = 0.0
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        steps += 1 if self.discard_next_to_last_sigma(p) else 0
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps)), device=devices.device) + 1, 0, 999)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]
        alphas_cumprod = shared.sd_model.alphas_cumprod
        xi = (x * torch.sqrt(alphas_cumprod[timesteps[t_enc]])
              + noise * torch.sqrt(1 - alphas_cumprod[timesteps[t_enc]]))

        extra_params_kwargs = self.initialize(p)
        if 'timesteps' in inspect.signature(self.func).parameters:
            extra_params_kwargs['timesteps'] = timesteps_sched

        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        return self.run_sampler(p, xi, t_enc + 1, conditioning, unconditional_conditioning, image_conditioning,
                                extra_params_kwargs)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)

        extra_params_kwargs = self.initialize(p)
        if 'timesteps' in inspect.signature(self.func).parameters:
            extra_params_kwargs['timesteps'] = timesteps

        self.last_latent = x
        return self.run_sampler(p, x, steps, conditioning, unconditional_conditioning, image_conditioning,
                                extra_params_kwargs)
