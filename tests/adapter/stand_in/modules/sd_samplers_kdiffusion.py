"""Stand-in k-diffusion samplers: ``CFGDenoiserKDiffusion`` over a CompVis-style denoiser, and a sampler whose
loops are ``lib_colorize.samplers`` (the same step functions the host-free pipeline uses)."""
from lib_colorize import samplers as cd_samplers
from lib_colorize.schedule import NoiseSchedule, make_denoiser
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisDenoiser:
    """k-diffusion's ``CompVisDenoiser``/``CompVisVDenoiser`` contract: ``D(x, sigma, cond=...) -> x0`` with
    ``c_in`` scaling and a fractional ``sigma_to_t``; schedule from the model's ``alphas_cumprod``."""

    def __init__(self, model, quantize=False):
        self.inner_model = model
        self.schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
        self.denoiser = make_denoiser(lambda x_in, t, cond: model.apply_model(x_in, t, cond),
                                      model.parameterization, self.schedule, quantize=quantize)
        self.calls = 0

    @property
    def sigmas(self):
        return self.schedule.sigmas

    def sigma_to_t(self, sigma, quantize=None):
        return self.schedule.sigma_to_t(sigma)

    def get_sigmas(self, n, kind="automatic"):
        return self.schedule.get_sigmas(n, kind)

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.denoiser(x, sigma, **kwargs)


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisDenoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


#: sampler name -> (lib_colorize sampler function, schedule key, stochastic)
SAMPLERS = {
    "Euler": (cd_samplers.sample_euler, "automatic", False),
    "Euler a": (cd_samplers.sample_euler_ancestral, "automatic", True),
    "DPM++ 2M": (cd_samplers.sample_dpmpp_2m, "karras", False),
}


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func, self.schedule_kind, self.stochastic = SAMPLERS[funcname]
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps, self.schedule_kind)

    def _run(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning, steps):
        self.initialize(p)
        extra_args = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                      "s_min_uncond": 0.0, "image_cond": image_conditioning}
        kwargs = {}
        if self.stochastic:
            kwargs["generator"] = cd_samplers.seeded_generators(p.seeds[0] + 10_000, x.shape[0])

        def callback(step, total, latent, denoised):
            self.callback_state(step)

        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra_args,
                                                             callback=callback, **kwargs))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps).to(x.device)
        x = x * sigmas[0]
        return self._run(p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning, steps)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas = self.get_sigmas(p, steps)[steps - t_enc - 1:].to(x.device)
        self.model_wrap_cfg.init_latent = x
        xi = x + noise * sigmas[0]
        return self._run(p, xi, sigmas, conditioning, unconditional_conditioning, image_conditioning, t_enc + 1)
