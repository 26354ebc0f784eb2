"""Stand-in ``modules.sd_samplers_common``: ``InterruptedException``, ``store_latent`` and the sampler base."""
from modules import shared


class InterruptedException(BaseException):
    pass


stored_latents = []


def store_latent(decoded):
    shared.state.current_latent = decoded
    stored_latents.append(decoded)


class Sampler:
    """The part of the webui's sampler base the extension sees: ``model_wrap_cfg`` (a fresh ``CFGDenoiser``
    per sampler, i.e. per sampling pass), ``last_latent``, and ``launch_sampling`` returning the last latent on
    interrupt."""

    def __init__(self, funcname):
        self.funcname = funcname
        self.model_wrap_cfg = None
        self.last_latent = None
        self.p = None
        self.sampler_extra_args = None

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)

    def callback_state(self, step):
        shared.state.sampling_step = step

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent
