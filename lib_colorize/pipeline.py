"""Host-free colorization: a ColorizeDiffusion checkpoint + OpenCLIP, no webui.

:class:`Colorizer` loads the models once and colorizes many sketches; a folder run encodes its one reference
once (the token cache is keyed by image content). It drives the same core as the webui adapter:
:mod:`~lib_colorize.conditioning` prepares the plan, the :mod:`~lib_colorize.processors` modify the U-Net for the
generation only, :func:`~lib_colorize.denoiser.guided_call` is the denoiser, and the samplers are
:mod:`lib_colorize.samplers` on the model's own noise schedule.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from PIL import Image

from .checkpoint import NATIVE_SIZES
from . import conditioning
from .denoiser import guided_call, k_noised_reference
from .errors import InvalidInput
from .guidance import cross_attention_scales
from . import processors as unet_processors
from .models import LATENT_SCALE
from .module_info import module_dtype
from .options import NUM_ATTENTION_LAYERS, ColorizeOptions
from .preprocess import (check_resolution, crop_to_box, default_size_for, prepare_reference, prepare_sketch,
                         reference_for_injection, tensor_to_images)
from .samplers import get_sampler, initial_noise, seeded_generators
from .schedule import NoiseSchedule, make_denoiser

logger = logging.getLogger(__name__)

MAX_SEED = 2 ** 32 - 1


@dataclass
class SamplingOptions:
    """What the webui owns in its own UI (sampler, steps, seed, size, batch); the CLI exposes the same."""

    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    steps: int = 20
    seed: int = -1
    width: Optional[int] = None
    height: Optional[int] = None
    batch_size: int = 1

    def resolved_seed(self) -> int:
        return self.seed if self.seed >= 0 else random.randint(0, MAX_SEED)

    def check(self) -> None:
        try:
            get_sampler(self.sampler, self.schedule)
        except ValueError as error:
            raise InvalidInput("sampler", str(error)) from None
        if not 1 <= self.steps <= 150:
            raise InvalidInput("steps", f"{self.steps} is out of range [1, 150]")
        if not 1 <= self.batch_size <= 8:
            raise InvalidInput("batch_size", f"{self.batch_size} is out of range [1, 8]")
        if not -1 <= self.seed <= MAX_SEED:
            raise InvalidInput("seed", f"{self.seed} is out of range [-1, {MAX_SEED}]")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidInput(name, f"{value} must be positive (a multiple of 64)")
            if value is not None and (value < 64 or value % 64):
                raise InvalidInput(name, f"{value} is not a multiple of 64 (method §8.4); try "
                                         f"{max(64, round(value / 64) * 64)}")


@dataclass
class ColorizeResult:
    images: list                                # PIL images (cropped when crop_result)
    latents: torch.Tensor                       # final latents (B, 4, h, w)
    seed: int
    width: int
    height: int
    sketch: Optional[Image.Image] = None        # the line art the model saw (return_sketch)
    heatmap: Optional[Image.Image] = None       # manipulation heat map (return_heatmap)
    stats: dict = field(default_factory=dict)


class OffloadedEncoder(torch.nn.Module):
    """The OpenCLIP image tower (about 0.6 B parameters) waits on the CPU and visits ``device`` for one encode
    (off the GPU between encodes, where the U-Net needs the memory). Cache lookups see it on the CPU, so cache keys stay stable."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = encoder.to("cpu")
        self.run_device = device
        self.instance_id = id(encoder)

    def encode_full(self, images: torch.Tensor) -> torch.Tensor:
        self.inner.to(self.run_device)
        try:
            return self.inner.encode_full(images.to(self.run_device))
        finally:
            self.inner.to("cpu")


class Colorizer:
    """Loaded models of one checkpoint; :meth:`colorize` is one generation."""

    def __init__(self, checkpoint, clip, *, device="cpu", dtype=torch.float32, models_dir=None,
                 allow_download: bool = True, token_cache=None, keep_clip_on_device: bool = False):
        from .models.clip import ReferenceTokenCache

        self.checkpoint = checkpoint
        self.unet, self.vae, self.sketch_encoder = checkpoint.unet, checkpoint.vae, checkpoint.sketch_encoder
        self.clip = clip
        self.device = torch.device(device)
        self.dtype = dtype
        self.models_dir = models_dir
        self.allow_download = allow_download
        self.schedule = NoiseSchedule.scaled_linear()
        self.token_cache = token_cache if token_cache is not None else ReferenceTokenCache()
        reference = clip.reference
        if reference is not None and self.device.type != "cpu" and not keep_clip_on_device:
            reference = OffloadedEncoder(reference, self.device)
        self.reference_encoder = reference
        self.stats = {"sketch_encoder_calls": 0}

    @classmethod
    def from_files(cls, checkpoint_path, *, clip_arch="ViT-H-14", clip_weights=None, models_dir=None,
                   device="cpu", dtype=torch.float32, allow_download=True, progress=None) -> "Colorizer":
        """Load a checkpoint and OpenCLIP. ``models_dir``: the folder of the OpenCLIP and line-extractor weights
        (None: the Hugging Face cache); ``progress``: a :data:`lib_colorize.weights.ProgressCallback` for
        downloads. Each load is logged (``lib_colorize`` logger, INFO) with its duration."""
        from .checkpoint import load_checkpoint
        from .models.clip import load_clip

        started = time.monotonic()
        logger.info("loading checkpoint %s", checkpoint_path)
        checkpoint = load_checkpoint(checkpoint_path, dtype=dtype, device=device)
        logger.info("loaded checkpoint (%s, %s) in %.1f s", checkpoint.info.version,
                    checkpoint.info.parameterization, time.monotonic() - started)
        # CLIP is loaded on the CPU: Colorizer moves the image tower to the GPU only for an encode
        clip = load_clip(clip_arch, weights=clip_weights, models_dir=models_dir, allow_download=allow_download,
                         device="cpu", dtype=torch.float32, progress=progress)
        if clip.text is not None:
            clip.text.to(device)
        return cls(checkpoint, clip, device=device, dtype=dtype, models_dir=models_dir,
                   allow_download=allow_download)

    # ------------------------------------------------------------------ pieces
    @property
    def parameterization(self) -> str:
        return self.checkpoint.info.parameterization

    @property
    def native_size(self) -> int:
        return NATIVE_SIZES.get(self.checkpoint.info.version, 512)

    def output_size(self, options: ColorizeOptions, sampling: SamplingOptions) -> tuple[int, int]:
        """(W, H): given; one side given, the other from the sketch's aspect ratio; else the sketch's aspect ratio
        at the model's native size (multiples of 64)."""
        width, height = default_size_for(options.sketch.size, native=self.native_size, width=sampling.width,
                                         height=sampling.height)
        check_resolution(width, height)
        return width, height

    def encode_reference_full(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.token_cache.get_or_encode(self.reference_encoder, image.float())
        return tokens.to(self.device, self.dtype)

    def encode_text(self, texts):
        self.clip.text.validate(texts)
        return self.clip.text.encode(list(texts)).to(self.device, self.dtype)

    def extractor(self, options: ColorizeOptions) -> Callable:
        from .extractors import extract_lines

        def extract(image: Image.Image, size: int) -> torch.Tensor:
            return extract_lines(options.line_extractor, image, size, models_dir=self.models_dir,
                                 device=self.device, allow_download=self.allow_download)
        return extract

    def reference_tokens(self, options: ColorizeOptions) -> torch.Tensor:
        reference = prepare_reference(options.reference, options.pad_reference)
        return conditioning.reference_tokens(
            self.encode_reference_full, reference, options.active_manipulations,
            self.encode_text if self.clip.text is not None else None,
            context_dim=self.unet.config.context_dim).to(self.device, self.dtype)

    def heatmap(self, options: ColorizeOptions, control: Optional[str] = None,
                thresholds=None) -> Image.Image:
        """The manipulation heat map of the reference (method §7.5). With ``control``: the regions it selects after
        all groups (the "Visualize" image). Without: the regions each group selects before it is applied, one tile
        per group from left to right (:func:`~lib_colorize.manipulation.group_heatmaps`)."""
        from .manipulation import group_heatmaps, manipulation_heatmap, tile_heatmaps

        if options.reference is None:
            raise InvalidInput("reference", "the heat map needs a reference image")
        groups = list(options.manipulations)
        encode_full = lambda image: self.encode_reference_full(image).float()  # noqa: E731
        encode_text = lambda texts: self.encode_text(texts).float()  # noqa: E731
        if control is not None:
            return manipulation_heatmap(options.reference, groups, control, thresholds, encode_full, encode_text)
        if not groups:
            raise InvalidInput("manipulations", "the heat map needs at least one manipulation group "
                                                "(its control prompt selects the regions)")
        return tile_heatmaps(group_heatmaps(options.reference, groups, encode_full, encode_text))

    # ------------------------------------------------------------------ generation
    def processors_for(self, layer_scales, injection: bool) -> unet_processors.ProcessorSet:
        """The U-Net processors of one generation (a benchmark substitutes the original's injection here)."""
        return unet_processors.for_generation(self.unet, layer_scales=layer_scales, injection=injection)

    def denoise(self, plan, processors, inner_model, x, sigma, t, noised_reference) -> torch.Tensor:
        """One guided denoiser evaluation (:func:`~lib_colorize.denoiser.guided_call`)."""
        return guided_call(plan, processors, inner_model, x, sigma, t, noised_reference=noised_reference)

    @torch.no_grad()
    def colorize(self, options: ColorizeOptions, sampling: SamplingOptions = SamplingOptions(),
                 callback: Optional[Callable] = None,
                 interrupt: Optional[Callable[[], bool]] = None) -> ColorizeResult:
        """One generation of ``sampling.batch_size`` images. Same seed and options give the same images."""
        options.check()
        sampling.check()
        width, height = self.output_size(options, sampling)
        seed = sampling.resolved_seed()
        seeds = [seed + i for i in range(sampling.batch_size)]   # the webui's per-image seeds
        sampler = get_sampler(sampling.sampler, sampling.schedule)
        latent_h, latent_w = height // 8, width // 8

        sketch, box = prepare_sketch(options.sketch, options.sketch_mode, (height, width),
                                     self.extractor(options) if options.sketch_mode == "extract" else None)
        tokens = self.reference_tokens(options)
        injection_reference = None
        if options.injection and options.reference is not None:
            injection_reference = reference_for_injection(options.reference, (height, width))
        stats: dict = {}
        sketch_hints, blank_hints, injection_hints = conditioning.encode_sketch_hints(
            self.sketch_encoder, sketch.to(self.device), options.sketch_strength,
            injection_reference, options.injection_sketch_fidelity, stats)
        self.stats["sketch_encoder_calls"] += stats["sketch_encoder_calls"]
        injection = None
        if injection_reference is not None:
            injection = conditioning.build_injection(
                options, self.vae.encode, injection_reference.to(self.device, self.vae_dtype), injection_hints,
                seeds, dtype=self.dtype)
        plan = conditioning.build_plan(options, sketch_hints=sketch_hints, blank_hints=blank_hints,
                                       tokens=tokens, injection=injection)
        scales = cross_attention_scales(options.reference_strength, options.level_scales, options.layer_scales,
                                        num_layers=NUM_ATTENTION_LAYERS)

        unet = self.unet
        denoiser = make_denoiser(lambda x_in, t, context: unet(x_in.to(self.dtype), t, context).float(),
                                 self.parameterization, self.schedule)

        def inner_model(x_in, sigma_in, context):
            return denoiser(x_in, sigma_in, context=context)

        processors = self.processors_for(scales, injection is not None)

        def model(x, sigma):
            return self.denoise(plan, processors, inner_model, x, sigma, self.schedule.sigma_to_t(sigma),
                                k_noised_reference(self.schedule.sigmas, self.schedule.sigma_to_t))

        sigmas = sampler.sigmas(self.schedule, sampling.steps).to(self.device)
        generators = seeded_generators(seed, sampling.batch_size)
        x = initial_noise((sampling.batch_size, 4, latent_h, latent_w), seed, float(sigmas[0]),
                          generators=generators, device=self.device)
        # image i's noise: its generator continues its own seeded stream (ancestral samplers), or its own
        # Brownian tree seeded seeds[i] (SDE samplers), so a batch image equals the single generation of its seed
        kwargs = dict(sampler.noise_args(x, sigmas, generators, seeds), callback=callback, interrupt=interrupt)
        with processors:
            latents = sampler.func(model, x, sigmas, **kwargs)
        images = self.decode(latents)
        if options.crop_result:
            images = [crop_to_box(image, box) for image in images]
        result = ColorizeResult(images=images, latents=latents, seed=seed, width=width, height=height,
                                stats=dict(plan.stats, sketch_encoder_calls=stats["sketch_encoder_calls"]))
        if options.return_sketch:
            result.sketch = tensor_to_images(sketch)[0]
        if options.return_heatmap and options.manipulations and options.reference is not None:
            result.heatmap = self.heatmap(options)
        return result

    @property
    def vae_dtype(self) -> torch.dtype:
        return module_dtype(self.vae)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """One image at a time, as the webui decodes, so an image does not depend on its batch."""
        images = []
        for latent in latents.split(1):
            images += tensor_to_images(self.vae.decode((latent / LATENT_SCALE).to(self.vae_dtype)).float().cpu())
        return images
