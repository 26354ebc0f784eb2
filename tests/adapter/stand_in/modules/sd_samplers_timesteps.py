"""Stand-in timestep samplers (DDIM): ``sigma`` passed to the denoiser *is* the timestep, the output is eps, and
masks are blended before denoising (webui-integration §2.1)."""
import torch

from lib_colorize.schedule import ddim_timesteps
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        v = self.inner_model.apply_model(input, timesteps, **kwargs)
        a = self.inner_model.alphas_cumprod[timesteps.to(torch.int)].view(-1, 1, 1, 1)
        return a.sqrt() * v + (1 - a).sqrt() * input


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
            cls = CompVisTimestepsVDenoiser if shared.sd_model.parameterization == "v" else CompVisTimestepsDenoiser
            self.model_wrap = cls(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    """Deterministic DDIM (eta 0) on uniform timesteps, in DDPM space."""

    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        if funcname == "ddim_cfgpp":
            self.model_wrap_cfg.cond_scale_miltiplier = 1 / 12.5
            self.model_wrap_cfg.need_last_noise_uncond = True

    def _loop(self, p, x, timesteps, conditioning, unconditional_conditioning, image_conditioning):
        self.initialize(p)
        alphas = shared.sd_model.alphas_cumprod.float()
        extra = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                 "s_min_uncond": 0.0, "image_cond": image_conditioning}
        s_in = x.new_ones(x.shape[0])

        def run():
            nonlocal x
            ts = list(timesteps)
            for i, t in enumerate(ts):
                t_prev = ts[i + 1] if i + 1 < len(ts) else None
                e_t = self.model_wrap_cfg(x, float(t) * s_in, **extra)
                a_t = alphas[int(t)]
                a_prev = alphas[int(t_prev)] if t_prev is not None else torch.tensor(1.0)
                pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
                x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
                self.callback_state(i)
            return x

        return self.launch_sampling(len(timesteps), run)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = ddim_timesteps(steps).flip(0).tolist()
        return self._loop(p, x, timesteps, conditioning, unconditional_conditioning, image_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        timesteps = ddim_timesteps(steps).flip(0).tolist()[steps - t_enc - 1:]
        a = shared.sd_model.alphas_cumprod.float()[int(timesteps[0])]
        self.model_wrap_cfg.init_latent = x
        xi = a.sqrt() * x + (1 - a).sqrt() * noise
        return self._loop(p, xi, timesteps, conditioning, unconditional_conditioning, image_conditioning)
