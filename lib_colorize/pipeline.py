"""Host-free colorization: a ColorizeDiffusion checkpoint + its reference encoder, no webui.

The SD2.1 models take OpenCLIP ViT-H/14; the XL models (sdxl, xlv2) take the XL reference encoder (CLIP ViT-bigG-14,
the WD tagger and the checkpoint's projector, :mod:`lib_colorize.models.xl_reference`), which is loaded for its
encode and released afterwards (staged loading, method-xl §9).

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
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from . import conditioning
from .denoiser import guided_call, k_noised_reference
from .errors import InvalidInput
from .guidance import cross_attention_scales, xl_cross_attention_scales
from . import processors as unet_processors
from .family import NATIVE_SIZES, family_of
from .module_info import module_dtype
from .options import NUM_ATTENTION_LAYERS, ColorizeOptions
from .preprocess import (autofit_size, check_resolution, crop_to_box, default_size_for, prepare_reference,
                         prepare_sketch, reference_for_injection, tensor_to_images)
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
    #: size from the sketch by the XL app's "Autofit size" rule; None: on for the XL models, off otherwise
    autofit: Optional[bool] = None

    def resolved_seed(self) -> int:
        return self.seed if self.seed >= 0 else random.randint(0, MAX_SEED)

    def check(self, size_multiple: int = 64) -> None:
        """``size_multiple``: the model family's (64; XL 32)."""
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
                raise InvalidInput(name, f"{value} must be positive (a multiple of {size_multiple})")
            if value is not None and (value < size_multiple or value % size_multiple):
                raise InvalidInput(name, f"{value} is not a multiple of {size_multiple}; try "
                                         f"{max(size_multiple, round(value / size_multiple) * size_multiple)}")


@dataclass
class ColorizeResult:
    images: list                                # PIL images (cropped when crop_result)
    latents: torch.Tensor                       # final latents (B, 4, h, w)
    seed: int
    width: int
    height: int
    sketch: Optional[Image.Image] = None        # the line art the model saw (return_sketch)
    heatmap: Optional[Image.Image] = None       # manipulation heat map (return_heatmap)
    masks: list = field(default_factory=list)   # the masks the enhance modes used (return_masks)
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
        self.family = family_of(checkpoint.info.version)
        self.unet, self.vae, self.sketch_encoder = checkpoint.unet, checkpoint.vae, checkpoint.sketch_encoder
        self.clip = clip
        self.device = torch.device(device)
        self.dtype = dtype
        self.models_dir = models_dir
        self.allow_download = allow_download
        self.schedule = NoiseSchedule.scaled_linear()
        self.token_cache = token_cache if token_cache is not None else ReferenceTokenCache()
        # XL: the XL reference encoder, which stages its own encoders (``clip`` is that encoder)
        reference = clip if self.family.is_xl else clip.reference
        if reference is not None and self.device.type != "cpu" and not keep_clip_on_device and not self.family.is_xl:
            reference = OffloadedEncoder(reference, self.device)
        self.reference_encoder = reference
        self.stats = {"sketch_encoder_calls": 0}
        from .cache import ContentCache
        from .masks import MaskExtractors

        self.enhance_cache = ContentCache()
        self.mask_extractors = MaskExtractors(models_dir, self.device, allow_download, cache=self.enhance_cache,
                                              offload=self.device.type != "cpu")
        self._enhance_modules = None

    @classmethod
    def from_files(cls, checkpoint_path, *, clip_arch="ViT-H-14", clip_weights=None, models_dir=None,
                   device="cpu", dtype=torch.float32, allow_download=True, progress=None,
                   encode_first: Sequence[ColorizeOptions] = ()) -> "Colorizer":
        """Load a checkpoint and OpenCLIP (XL: :meth:`from_xl_files`). ``models_dir``: the folder of the OpenCLIP
        and line-extractor weights (None: the Hugging Face cache); ``progress``: a
        :data:`lib_colorize.weights.ProgressCallback` for downloads. Each load is logged (``lib_colorize`` logger,
        INFO) with its duration."""
        from .checkpoint import inspect_checkpoint, load_checkpoint
        from .models.clip import load_clip

        if inspect_checkpoint(checkpoint_path).family.is_xl:
            from .models.clip_xl import clip_config_for

            return cls.from_xl_files(checkpoint_path, models_dir=models_dir, device=device, dtype=dtype,
                                     allow_download=allow_download, clip_config=clip_config_for(clip_arch),
                                     encode_first=encode_first)
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

    @classmethod
    def from_xl_files(cls, checkpoint_path, *, models_dir=None, device="cpu", dtype=torch.float32,
                      allow_download=True, clip_config=None, tagger_arch=None, encoder_dtype=None,
                      encode_first: Sequence[ColorizeOptions] = (),
                      on_stage: Optional[Callable[[str], None]] = None) -> "Colorizer":
        """An XL checkpoint and its reference encoder's weight files in ``models_dir`` (method-xl §1.4).

        Staged (method-xl §9): the encoders' files are found (or downloaded) before anything is loaded; the
        references of ``encode_first`` (a folder run's one reference) are encoded before the U-Net is loaded,
        each encoder loaded for its encode and released, so the peak is the larger of the two stages, not their
        sum; any other reference is encoded when it comes. ``encoder_dtype``: default ``dtype`` on a GPU,
        float32 on the CPU. ``on_stage(name)`` is called after "references encoded" (memory benchmarks).
        """
        from .checkpoint import PROJECTOR_PREFIX, load_checkpoint, read_tensors
        from .models.clip import ReferenceTokenCache
        from .models.projector import ClusterConcat
        from .models.xl_reference import xl_reference_encoder

        if models_dir is None:
            raise InvalidInput("models_dir", "the XL models need the folder of their reference encoders' weights")
        if encoder_dtype is None:
            encoder_dtype = dtype if torch.device(device).type != "cpu" else torch.float32
        projector = ClusterConcat.from_state_dict(read_tensors(checkpoint_path, PROJECTOR_PREFIX))
        projector = projector.to(device=device, dtype=dtype).eval().requires_grad_(False)
        reference = xl_reference_encoder(projector, models_dir, allow_download=allow_download, device=device,
                                         dtype=encoder_dtype, clip_config=clip_config, tagger_arch=tagger_arch)
        cache = ReferenceTokenCache()
        for options in encode_first:
            image = prepare_reference(options.reference, options.pad_reference)
            if image is not None:
                cache.get_or_encode(reference, image.float())
        if on_stage is not None:
            on_stage("references encoded")
        checkpoint = load_checkpoint(checkpoint_path, dtype=dtype, device=device,
                                     components=("unet", "vae", "sketch_encoder"))
        checkpoint.projector = projector
        if dtype == torch.float16:
            checkpoint.vae.float()   # the SDXL VAE overflows in fp16 (method-xl §7.3, §12 #11)
        return cls(checkpoint, reference, device=device, dtype=dtype, models_dir=models_dir,
                   allow_download=allow_download, token_cache=cache)

    # ------------------------------------------------------------------ pieces
    @property
    def parameterization(self) -> str:
        return self.checkpoint.info.parameterization

    @property
    def version(self) -> str:
        return self.checkpoint.info.version

    @property
    def native_size(self) -> int:
        return NATIVE_SIZES.get(self.version, 512)

    def output_size(self, options: ColorizeOptions, sampling: SamplingOptions) -> tuple[int, int]:
        """(W, H): given; one side given, the other from the sketch's aspect ratio; else the XL app's autofit of the
        sketch (XL default), or the sketch's aspect ratio at the model's native size (multiples of 64; XL 32 and
        1024² without autofit)."""
        multiple = self.family.size_multiple
        if self.family.is_xl and not (sampling.width and sampling.height):
            autofit = sampling.autofit is None or sampling.autofit
            if autofit and options.sketch is not None:
                width, height = autofit_size(options.sketch.size, area=self.native_size ** 2, multiple=multiple,
                                             limits=(self.family.min_size, self.family.max_size))
            else:
                width = height = self.native_size
            width, height = sampling.width or width, sampling.height or height
        else:
            width, height = default_size_for(options.sketch.size, native=self.native_size, width=sampling.width,
                                             height=sampling.height)
        check_resolution(width, height, multiple)
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
        if self.family.is_xl:
            return conditioning.xl_reference_context(self.encode_reference_full, reference,
                                                     self.unet.config.context_dim).to(self.device, self.dtype)
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

    # ------------------------------------------------------------------ enhance modes
    def enhance_modules(self, parts):
        """The checkpoint's extra modules ``parts`` (loaded on first use, kept for later generations)."""
        from .checkpoint import load_enhance_modules
        from .models.enhance import EnhanceModules

        if self._enhance_modules is None:
            self._enhance_modules = EnhanceModules(version=self.checkpoint.info.version,
                                                   path=self.checkpoint.info.path)
        have = self._enhance_modules
        missing = [p for p in parts if (not have.lora if p == "lora" else getattr(have, p) is None)]
        if missing:
            loaded = load_enhance_modules(self.checkpoint.info.path, missing, dtype=self.dtype, device=self.device,
                                          needed_by="the chosen enhance mode").to(dtype=self.dtype)
            for part in missing:
                setattr(have, part, getattr(loaded, part))
        return have

    def prepare_enhance(self, options: ColorizeOptions, sketch: torch.Tensor, box, tokens: torch.Tensor,
                        seeds, size):
        """The enhance plan and context of one generation (:func:`lib_colorize.enhance.prepare_enhance`)."""
        from . import enhance

        version = self.checkpoint.info.version
        if self.family.is_xl:
            return self.prepare_xl_enhance(options, sketch, box, tokens, seeds, size)
        modules = self.enhance_modules(enhance.needed_parts(version, options))
        inputs = enhance.prepare_mask_inputs(options, sketch, box, self.mask_extractors)
        return enhance.prepare_enhance(
            version, options, modules, tokens, inputs,
            encode_local=lambda image: self.encode_reference_full(image)[:, 1:],
            vae_encode=lambda image: self.vae.encode(image.to(self.device, self.vae_dtype)),
            seeds=seeds, size=size, cache=self.enhance_cache, device=self.device, dtype=self.dtype)

    def xl_loras(self) -> dict:
        """xlv2's background LoRA from the checkpoint (read on first use, kept)."""
        if getattr(self, "_xl_loras", None) is None:
            from .checkpoint import UNET_PREFIX, read_tensors
            from .enhance_xl import load_xlv2_lora

            tensors = read_tensors(self.checkpoint.info.path, UNET_PREFIX, keep=lambda key: ".lora_" in key)
            self._xl_loras = load_xlv2_lora(tensors, dtype=self.dtype, device=self.device)
        return self._xl_loras

    def load_reference_net(self) -> torch.nn.Module:
        """xlv2's ReferenceNet (2.0 B parameters), loaded for one generation's banks (the caller drops it)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self.checkpoint.info.path, dtype=self.dtype, device=self.device,
                               components=("reference_net",)).reference_net

    def prepare_xl_enhance(self, options: ColorizeOptions, sketch: torch.Tensor, box, tokens: torch.Tensor,
                           seeds, size):
        """The XL low-level injection of one generation (:func:`lib_colorize.enhance_xl.prepare_xl_enhance`)."""
        from . import enhance
        from .enhance_xl import prepare_xl_enhance

        inputs = enhance.prepare_mask_inputs(options, sketch, box, self.mask_extractors)
        return prepare_xl_enhance(
            self.version, options, tokens, inputs, encode_context=self.encode_reference_full,
            vae_encode=lambda image: self.vae.encode(image.to(self.device, self.vae_dtype)), seeds=seeds, size=size,
            cache=self.enhance_cache, extractors=self.mask_extractors, reference_net=self.load_reference_net,
            reference_net_key=self.checkpoint.info.path,
            loras=self.xl_loras() if self.version == "xlv2" else None, latent_scale=self.family.latent_scale,
            device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ generation
    def processors_for(self, layer_scales, injection: bool, enhance=None) -> unet_processors.ProcessorSet:
        """The U-Net processors of one generation (a benchmark substitutes the original's injection here)."""
        return unet_processors.for_generation(self.unet, layer_scales=layer_scales, injection=injection,
                                              enhance=enhance, hint_blocks=self.family.hint_blocks)

    def cross_attention_scales(self, options: ColorizeOptions) -> list:
        if self.family.is_xl:
            return xl_cross_attention_scales(self.version, options.reference_strength, options.level_scales)
        return cross_attention_scales(options.reference_strength, options.level_scales, options.layer_scales,
                                      num_layers=NUM_ATTENTION_LAYERS)

    def denoise(self, plan, processors, inner_model, x, sigma, t, noised_reference) -> torch.Tensor:
        """One guided denoiser evaluation (:func:`~lib_colorize.denoiser.guided_call`)."""
        return guided_call(plan, processors, inner_model, x, sigma, t, noised_reference=noised_reference)

    @torch.no_grad()
    def colorize(self, options: ColorizeOptions, sampling: SamplingOptions = SamplingOptions(),
                 callback: Optional[Callable] = None,
                 interrupt: Optional[Callable[[], bool]] = None) -> ColorizeResult:
        """One generation of ``sampling.batch_size`` images. Same seed and options give the same images."""
        options.check()
        options.check_version(self.version)
        sampling.check(self.family.size_multiple)
        from .enhance import check_version, remove_background

        check_version(options, self.version)
        if self.family.is_xl:
            from .enhance_xl import check_xl_enhance

            check_xl_enhance(self.version, options)
        width, height = self.output_size(options, sampling)
        seed = sampling.resolved_seed()
        seeds = [seed + i for i in range(sampling.batch_size)]   # the webui's per-image seeds
        sampler = get_sampler(sampling.sampler, sampling.schedule)
        latent_h, latent_w = height // 8, width // 8

        sketch, box = prepare_sketch(options.sketch, options.sketch_mode, (height, width),
                                     self.extractor(options) if options.sketch_mode == "extract" else None,
                                     xl=self.family.is_xl)
        tokens = self.reference_tokens(options)
        injection_reference = None
        if options.injection and options.reference is not None:
            injection_reference = reference_for_injection(options.reference, (height, width))
        stats: dict = {}
        if self.family.is_xl:
            self.sketch_encoder.rope = options.sketch_rope
        sketch_hints, blank_hints, injection_hints = conditioning.encode_sketch_hints(
            self.sketch_encoder, sketch.to(self.device), options.sketch_strength,
            injection_reference, options.injection_sketch_fidelity, stats,
            level_strengths=options.sketch_level_strengths if self.family.is_xl else None)
        self.stats["sketch_encoder_calls"] += stats["sketch_encoder_calls"]
        seeds = [seed + i for i in range(sampling.batch_size)]
        injection = None
        if injection_reference is not None:
            injection = conditioning.build_injection(
                options, self.vae.encode, injection_reference.to(self.device, self.vae_dtype), injection_hints,
                seeds, dtype=self.dtype, latent_scale=self.family.latent_scale)
        enhance_plan = None
        if options.enhanced:
            enhance_plan, tokens = self.prepare_enhance(options, sketch, box, tokens, seeds, (height, width))
        vector = conditioning.xl_vector(height, width).to(self.device) if self.family.is_xl else None
        plan = conditioning.build_plan(options, sketch_hints=sketch_hints, blank_hints=blank_hints,
                                       tokens=tokens, injection=injection, vector=vector, enhance=enhance_plan)
        scales = self.cross_attention_scales(options)

        unet = self.unet
        def unet_call(x_in, t, context, y=None):
            x_in = x_in.to(self.dtype)
            return (unet(x_in, t, context) if y is None else unet(x_in, t, context, y)).float()

        denoiser = make_denoiser(unet_call, self.parameterization, self.schedule)

        def inner_model(x_in, sigma_in, context, y=None):
            return denoiser(x_in, sigma_in, context=context, y=y)

        processors = self.processors_for(scales, injection is not None, enhance_plan)

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
        if options.remove_background:
            images = remove_background(images, lambda x: self.mask_extractors.reference(
                options.reference_mask_extractor, x, dilated=False), options.reference_mask_threshold)
        if options.crop_result:
            images = [crop_to_box(image, box) for image in images]
        result = ColorizeResult(images=images, latents=latents, seed=seed, width=width, height=height,
                                stats=dict(plan.stats, sketch_encoder_calls=stats["sketch_encoder_calls"]))
        if options.return_sketch:
            result.sketch = tensor_to_images(sketch)[0]
        if options.return_heatmap and options.manipulations and options.reference is not None:
            result.heatmap = self.heatmap(options)
        if options.return_masks and enhance_plan is not None:
            result.masks = enhance_plan.inputs.previews(options)
        return result

    @property
    def vae_dtype(self) -> torch.dtype:
        return module_dtype(self.vae)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """One image at a time, as the webui decodes, so an image does not depend on its batch."""
        images = []
        for latent in latents.split(1):
            latent = latent / self.family.latent_scale
            images += tensor_to_images(self.vae.decode(latent.to(self.vae_dtype)).float().cpu())
        return images
