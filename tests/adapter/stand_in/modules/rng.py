"""Stand-in ``modules.rng``: the webui's per-image random numbers (CPU/GPU source; no NV philox, no subseeds).

``ImageRNG`` keeps one generator per image seed: ``next()`` first gives each image's initial noise, then each
image's next draws from its own generator, so an image does not depend on the batch it is in. The sampler's
``TorchHijack`` makes k-diffusion's ``torch.randn_like`` call ``next()``. ``randn_local`` seeds a local generator
(the webui's replacement of torchsde's Brownian-interval noise)."""
import torch

from modules import devices, shared


def _source_device():
    return devices.cpu if shared.opts.randn_source == "CPU" or devices.device.type == "mps" else devices.device


def create_generator(seed):
    return torch.Generator(_source_device()).manual_seed(int(seed))


def randn_without_seed(shape, generator=None):
    return torch.randn(shape, device=_source_device(), generator=generator).to(devices.device)


def randn(seed, shape, generator=None):
    torch.manual_seed(seed)
    return randn_without_seed(shape, generator)


def randn_local(seed, shape):
    return randn_without_seed(shape, torch.Generator(_source_device()).manual_seed(int(seed)))


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        if subseed_strength:
            raise NotImplementedError("stand-in ImageRNG: no variation seeds")
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.generators = [create_generator(seed) for seed in seeds]
        self.is_first = True

    def first(self):
        noise = [randn(seed, self.shape, generator=g) for seed, g in zip(self.seeds, self.generators)]
        delta = shared.opts.eta_noise_seed_delta or 0
        if delta:
            self.generators = [create_generator(seed + delta) for seed in self.seeds]
        return torch.stack(noise).to(shared.device)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([randn_without_seed(self.shape, generator=g) for g in self.generators]).to(shared.device)


devices.randn = randn
devices.randn_local = randn_local
devices.randn_without_seed = randn_without_seed
