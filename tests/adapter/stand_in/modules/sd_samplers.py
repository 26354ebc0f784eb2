"""Stand-in ``modules.sd_samplers``: the sampler registry and ``create_sampler`` (a new sampler, with a new
``CFGDenoiser``, per call; ``sampler.config`` is its ``SamplerData``)."""
from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [
    *sd_samplers_kdiffusion.samplers_data_k_diffusion,
    *sd_samplers_timesteps.samplers_data_timesteps,
]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name, None) if name is not None else all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
