"""A Forge 2 generation for the tests, over the backend chosen by ``conftest.py``.

:class:`ForgeRun` plays the part of Forge's ``processing.py`` for one txt2img generation: the script hooks in
Forge's order, the reset of ``forge_objects`` before every sampling pass, and an Euler loop whose denoiser is
Forge's ``sampling_function`` (forge-integration §5.1) on the U-Net the hooks left in ``forge_objects``.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from cd_forge import model as forge_model


class Engine:
    """What the adapter reads of Forge's ``StableDiffusion2`` engine."""

    def __init__(self, unet, vae, name: str = "host-sd2", flags=("is_sd2",)):
        self.forge_objects = types.SimpleNamespace(unet=unet, vae=vae, clip=None, clipvision=None)
        self.forge_objects.shallow_copy = lambda: self._copy(self.forge_objects)
        self.forge_objects_original = self._copy(self.forge_objects)
        self.forge_objects_after_applying_lora = self._copy(self.forge_objects)
        self.sd_checkpoint_info = types.SimpleNamespace(name=name, filename=f"/nowhere/{name}.safetensors")
        for flag in ("is_sd1", "is_sd2", "is_sdxl"):
            setattr(self, flag, flag in flags)

    @classmethod
    def _copy(cls, objects):
        copy = types.SimpleNamespace(unet=objects.unet, vae=objects.vae, clip=objects.clip,
                                     clipvision=objects.clipvision)
        copy.shallow_copy = lambda: cls._copy(copy)
        return copy

    def reset(self):
        """Forge's reset before every sampling pass (and before process_batch)."""
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()


def host_engine(plain_sd_file: str) -> Engine:
    unet = forge_model.build_unet(plain_sd_file, "eps")
    return Engine(unet, forge_model.build_vae(plain_sd_file))


class ForgeRun:
    """One txt2img generation through the Forge adapter's hooks (``cd_forge.lifecycle``)."""

    def __init__(self, engine: Engine, args, *, batch: int = 1, seed: int = 7, steps: int = 4, size: int = 64,
                 cfg_scale: float = 7.0, hires: bool = False, observe=None):
        self.engine, self.args = engine, tuple(args)
        self.batch, self.steps, self.size, self.cfg_scale, self.hires = batch, steps, size, cfg_scale, hires
        self.observe = observe
        self.p = Processing(self, seed, batch)
        self.latents: Optional[torch.Tensor] = None
        self.images = None

    def sigmas(self, steps: int) -> torch.Tensor:
        predictor = self.engine.forge_objects_after_applying_lora.unet.model.predictor
        t = torch.linspace(len(predictor.sigmas) - 1, 0, steps)
        return torch.cat([predictor.sigma(t), torch.zeros(1)])

    def sample_pass(self, x: torch.Tensor, sigmas: torch.Tensor, uncond: bool) -> torch.Tensor:
        """One sampling pass from ``x`` (already at noise level ``sigmas[0]``)."""
        from backend.sampling.sampling_function import sampling_function
        from cd_forge import lifecycle

        engine = self.engine
        engine.reset()
        lifecycle.process_before_every_sampling(self.p, x=x, noise=x, c=None, uc=None)
        denoiser = types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=engine), p=self.p)
        from lib_colorize.processors import transformer_blocks

        batch = x.shape[0]
        width = transformer_blocks(engine.forge_objects.unet.model.diffusion_model)[0].attn2.to_k.weight.shape[1]
        text = torch.randn(batch, 77, width, generator=torch.Generator().manual_seed(0))   # the prompt's conds
        composition = [[(i, 1.0)] for i in range(batch)]
        for i in range(len(sigmas) - 1):
            params = types.SimpleNamespace(x=x, sigma=sigmas[i].expand(batch), text_cond=text,
                                           text_uncond=torch.zeros_like(text) if uncond else None, image_cond=None)
            if self.observe is not None:
                self.observe(self, x, sigmas[i].expand(batch))
            denoised = sampling_function(denoiser, params, self.cfg_scale if uncond else 1.0, composition)[0]
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    def run(self):
        from cd_forge import lifecycle

        p = self.p
        lifecycle.before_process(p, *self.args)
        lifecycle.process(p, *self.args)
        self.latents = p.sample()
        vae = self.engine.forge_objects.vae
        self.images = vae.decode(vae.first_stage_model.process_out(self.latents))
        processed = types.SimpleNamespace(images=[], infotexts=[])
        lifecycle.postprocess(p, processed, *self.args)
        return self


def image_noise(seeds, shape) -> torch.Tensor:
    """Each image's initial noise from its own seed (as Forge's ImageRNG draws it)."""
    return torch.cat([torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


class Processing:
    """The ``p`` of a txt2img generation, as far as the adapter reads it."""

    sampler_name = "Euler"
    hr_sampler_name = None
    refiner_checkpoint = None

    def __init__(self, run: ForgeRun, seed: int, batch: int):
        self.run = run
        self.sd_model = run.engine
        self.seed, self.seeds = seed, [seed + i for i in range(batch)]
        self.extra_generation_params = {}

    def sample(self, *args, **kwargs):
        run = self.run
        latent = run.size // 8
        noise = image_noise(self.seeds, (4, latent, latent))
        sigmas = run.sigmas(run.steps)
        x = run.sample_pass(noise * sigmas[0], sigmas, uncond=run.cfg_scale != 1)
        if run.hires:
            x = torch.nn.functional.interpolate(x, scale_factor=1.5, mode="nearest")
            # Forge calls the hook once more before it resets the U-Net (forge-integration §1.2)
            from cd_forge import lifecycle

            lifecycle.process_before_every_sampling(self, x=x, noise=x, c=None, uc=None)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed + 100))
            sigmas = run.sigmas(4)[2:]   # the hires pass's last two steps; the API's hr_cfg 1: no uncond
            x = run.sample_pass(x + noise * sigmas[0], sigmas, uncond=False)
        return x
