"""Stand-in ``modules.sd_samplers.create_sampler``: a new sampler (and a new ``CFGDenoiser``) per call."""
from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

TIMESTEP_SAMPLERS = {"DDIM": "ddim", "DDIM CFG++": "ddim_cfgpp"}


def create_sampler(name, model):
    if name in TIMESTEP_SAMPLERS:
        return sd_samplers_timesteps.CompVisSampler(TIMESTEP_SAMPLERS[name], model)
    if name in sd_samplers_kdiffusion.SAMPLERS:
        return sd_samplers_kdiffusion.KDiffusionSampler(name, model)
    raise ValueError(f"stand-in: unknown sampler {name!r}")
