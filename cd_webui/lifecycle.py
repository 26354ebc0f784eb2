"""Per-generation state and hook lifecycle of the ColorizeDiffusion script (webui-integration §1.3-1.6).

============================  ================================================================================
script hook                   what happens
============================  ================================================================================
``before_process``            self-heal: remove processors left by a crashed earlier run; reset the per-``p`` state
                              (the img2img batch tab reuses ``p``); undo an earlier ``p.sample`` wrapper
``process``                   parse the args (:func:`cd_webui.args.parse_script_args`, ``p.cd_*`` overrides
                              first), write the ``CD ...`` infotext (without the unused "CFG scale"), validate
                              (ColorizeDiffusion checkpoint, no refiner, supported sampler, ``enabled`` a
                              boolean), encode the reference; wrap ``p.sample``
``process_before_every_``     per sampling pass (twice with hires fix): conflicting features
``sampling``                  (:mod:`cd_webui.conflicts`), the sketch at this pass's size, the injection latent,
                              the plan; install the :mod:`~lib_colorize.processors`; bind our forward to
                              ``p.sampler.model_wrap_cfg`` (:mod:`cd_webui.sampling`)
``p.sample`` wrapper          raises the user errors collected above (the runner swallows exceptions in
                              ``process``; these reach the UI/API), and ALWAYS removes the processors (``finally``)
``postprocess_image``         "Remove background in result", then "Crop result"
``postprocess``               remove processors; add the processed sketch / masks / heat map to the gallery when asked
============================  ================================================================================

Disabled: nothing is installed, ``p`` is not touched (except that stale ``CD ...`` infotext keys of an earlier
X/Y/Z cell are removed, and a ColorizeDiffusion checkpoint gets a note that it needs the accordion), so the output
is bit-identical to a webui without the extension.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from lib_colorize import conditioning
from lib_colorize.errors import ColorizeError, InvalidInput
from lib_colorize.guidance import cross_attention_scales, xl_cross_attention_scales
from lib_colorize import processors as unet_processors
from lib_colorize.options import NUM_ATTENTION_LAYERS, ColorizeOptions

from . import conflicts, model, sampling

logger = logging.getLogger(__name__)

STATE_ATTR = "colorize_state"
#: Pixels per latent cell (the webui's ``opt_f``).
LATENT_FACTOR = 8
#: The webui's infotext key of ``p.cfg_scale``.
CFG_SCALE_KEY = "CFG scale"
NOTICE_DISABLED = ("ColorizeDiffusion: this is a ColorizeDiffusion checkpoint, which ignores the prompt; open the "
                   "ColorizeDiffusion accordion and give a sketch and a reference to colorize")
#: Samplers whose denoiser contract the override cannot honour.
UNSUPPORTED_SAMPLERS = {"DDIM CFG++": "it rescales CFG internally (cond_scale_miltiplier / last_noise_uncond)"}


@dataclass
class GenerationState:
    """Everything one ``process_images`` call needs across the script hooks (kept on ``p``)."""

    options: Optional[ColorizeOptions] = None
    error: Optional[BaseException] = None
    is_img2img: bool = False
    info: Any = None                             # CheckpointInfo of the loaded model (version, family)
    scales: Optional[list] = None
    tokens: Optional[torch.Tensor] = None        # reference context (1, N, D), after manipulation
    processors: Optional[unet_processors.ProcessorSet] = None
    context: Optional[sampling.SamplingContext] = None
    passes: int = 0
    first_size: Optional[tuple] = None           # (W, H) of the first sampling pass
    box: Optional[tuple] = None                  # sketch box of the last pass, in its canvas, for "Crop result"
    box_canvas: Optional[tuple] = None           # (W, H) of that canvas
    sketch_preview: Any = None                   # the line art the model saw (first pass), PIL
    mask_previews: list = field(default_factory=list)   # the enhance modes' masks (first pass), PIL
    stats: dict = field(default_factory=dict)

    def release(self) -> None:
        """Remove this generation's processors (idempotent)."""
        if self.processors is not None:
            self.processors.remove()
            self.processors = None


def get_state(p) -> Optional[GenerationState]:
    return getattr(p, STATE_ATTR, None)


def is_img2img(p) -> bool:
    try:
        from modules.processing import StableDiffusionProcessingImg2Img

        return isinstance(p, StableDiffusionProcessingImg2Img)
    except ImportError:  # pragma: no cover
        return hasattr(p, "init_images")


# ------------------------------------------------------------------------------------------ before_process
def before_process(p, *args) -> None:
    removed = unet_processors.remove_all()
    if removed:
        print(f"ColorizeDiffusion: removed {removed} processor set(s) left over from an interrupted generation")
    state = get_state(p)
    if state is not None:
        state.release()
    setattr(p, STATE_ATTR, None)
    _unwrap_sample(p)


# ------------------------------------------------------------------------------------------------- process
def _enabled_value(args: Sequence[Any], p) -> Any:
    """The ``enabled`` value as given (``p.cd_enabled`` first), read without validating anything."""
    override = getattr(p, "cd_enabled", None)
    if override is not None:
        return override
    if args and isinstance(args[0], dict):
        from .args import pasted_enabled

        return args[0]["enabled"] if "enabled" in args[0] else pasted_enabled(args)
    return args[0] if args else False


def _is_off(value: Any) -> bool:
    """Only an explicit off (or nothing) disables quietly; any other non-boolean is an error naming the field."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _pop_infotext(p) -> None:
    from lib_colorize.infotext import ALL_INFOTEXT_KEYS

    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        for key in ALL_INFOTEXT_KEYS:
            params.pop(key, None)
        if CFG_SCALE_KEY in params and params[CFG_SCALE_KEY] is None:   # ours, from an earlier X/Y/Z cell
            del params[CFG_SCALE_KEY]


def _notice_if_colorize_model(p) -> None:
    """Disabled on a ColorizeDiffusion checkpoint: say why the prompt does nothing (only a note; ``p`` is
    otherwise untouched)."""
    try:
        colorize = model.is_colorize_model(getattr(p, "sd_model", None))
    except Exception:  # noqa: BLE001 - a note must never break a plain generation
        return
    if colorize:
        conflicts.notice(p, NOTICE_DISABLED)


def process(p, *args, prepare=None, state_type=None) -> None:
    """Resolve options, write infotext, validate and prepare; errors are raised later from ``p.sample``.

    ``prepare(p, state)`` and ``state_type`` are the host's (the Forge adapter passes its own); by default this
    webui's :func:`_prepare` and :class:`GenerationState`."""
    from lib_colorize.infotext import options_to_infotext

    from .args import parse_script_args

    _pop_infotext(p)
    state = (state_type or GenerationState)(is_img2img=is_img2img(p))
    try:
        options = parse_script_args(args, p, is_img2img=state.is_img2img)
    except Exception as error:  # noqa: BLE001 - reported through p.sample unless clearly disabled
        if _is_off(_enabled_value(args, p)):
            logger.debug("ColorizeDiffusion disabled; ignored unparsable args: %s", error)
            _notice_if_colorize_model(p)
            return
        state.error = error
        setattr(p, STATE_ATTR, state)
        _wrap_sample(p, state)
        return
    if not options.enabled:
        _notice_if_colorize_model(p)
        return
    state.options = options
    setattr(p, STATE_ATTR, state)
    _wrap_sample(p, state)
    p.extra_generation_params.update(options_to_infotext(options, _loaded_version(p)))
    # The webui writes "CFG scale" from p.cfg_scale, which the guidance scales replace: None leaves it out.
    p.extra_generation_params[CFG_SCALE_KEY] = None
    try:
        (prepare or _prepare)(p, state)
    except Exception as error:  # noqa: BLE001 - raised from p.sample (the runner would swallow it here)
        state.error = error


def _loaded_version(p) -> Optional[str]:
    """The ColorizeDiffusion version of the loaded checkpoint, None when it is not one (reported later)."""
    try:
        return model.require_colorize_model(_unet_of(p)[0]).version
    except Exception:  # noqa: BLE001 - not a ColorizeDiffusion model: _prepare says so
        return None


def _check_supported(p) -> None:
    refiner = getattr(p, "refiner_checkpoint", None)
    if refiner and str(refiner) not in ("None", ""):
        raise InvalidInput("refiner", "ColorizeDiffusion cannot be combined with the refiner (an SDXL feature); "
                                      "turn the refiner off")
    for name in (getattr(p, "sampler_name", None), getattr(p, "hr_sampler_name", None)):
        if name in UNSUPPORTED_SAMPLERS:
            raise InvalidInput("sampler", f"the {name} sampler is not supported with ColorizeDiffusion: "
                                          f"{UNSUPPORTED_SAMPLERS[name]}; choose another sampler")


def _context_dim(unet) -> int:
    blocks = unet_processors.transformer_blocks(unet)
    if not blocks:
        raise ColorizeError("ColorizeDiffusion: the loaded U-Net has no transformer blocks")
    to_k = blocks[0].attn2.to_k
    return int(getattr(to_k, "in_features", to_k.weight.shape[1]))


def _unet_of(p):
    sd_model = getattr(p, "sd_model", None)
    if sd_model is None:
        from modules import shared

        sd_model = shared.sd_model
    return sd_model, sd_model.model.diffusion_model


def _prepare(p, state: GenerationState) -> None:
    """Validation and everything that does not depend on the sampling size (once per generation)."""
    _check_supported(p)
    sd_model, unet = _unet_of(p)
    state.info = info = model.require_colorize_model(sd_model)
    check_model_options(state.options, info)
    prepare_conditioning(state, unet)


def check_model_options(options, info) -> None:
    """What the loaded model cannot honour is refused: the error names the key and the version it needs."""
    from lib_colorize.enhance import check_version

    options.check_version(info.version)
    check_version(options, info.version)
    if info.family.is_xl:
        from lib_colorize.enhance_xl import check_xl_enhance

        check_xl_enhance(info.version, options)


def prepare_conditioning(state: GenerationState, unet, dtype: Optional[torch.dtype] = None) -> None:
    """The sketch check, the cross-attention scales and the reference tokens (for ``unet``, in ``dtype``: by
    default its parameters'), on any host; ``state.info`` is the model's checkpoint info."""
    from lib_colorize.preprocess import prepare_reference

    options, info = state.options, state.info
    if options.sketch is None:
        raise InvalidInput("sketch", "ColorizeDiffusion is enabled but no sketch was given")
    reference = prepare_reference(options.reference, options.pad_reference)
    if info.family.is_xl:
        state.scales = xl_cross_attention_scales(info.version, options.reference_strength, options.level_scales)
        tokens = conditioning.xl_reference_context(model.encode_xl_reference, reference, _context_dim(unet))
    else:
        state.scales = cross_attention_scales(options.reference_strength, options.level_scales,
                                              options.layer_scales, num_layers=NUM_ATTENTION_LAYERS)
        manipulations = options.active_manipulations
        tokens = conditioning.reference_tokens(model.encode_reference_full, reference, manipulations,
                                               model.encode_text if manipulations else None,
                                               context_dim=_context_dim(unet))
    # the compute device, not the U-Net's parameters' (under --lowvram those wait on the CPU between calls)
    state.tokens = tokens.to(device=model.compute_device(), dtype=dtype or model.unet_input_dtype())


# ------------------------------------------------------------------------------------------- p.sample wrapper
def _wrap_sample(p, state: GenerationState) -> None:
    _unwrap_sample(p)
    original = p.sample

    def sample(*args, **kwargs):
        try:
            if state.error is not None:
                raise state.error
            result = original(*args, **kwargs)
            if state.error is not None:  # a sampling pass could not be prepared (its hook error was swallowed)
                raise state.error
            return result
        finally:
            state.release()

    sample.colorize_original = original
    p.sample = sample


def _unwrap_sample(p) -> None:
    current = getattr(p, "__dict__", {}).get("sample")
    original = getattr(current, "colorize_original", None)
    if original is not None:
        if getattr(original, "__self__", None) is p and getattr(original, "__func__", None) is getattr(
                type(p), "sample", None):
            del p.__dict__["sample"]
        else:
            p.sample = original


# -------------------------------------------------------------------------------- process_before_every_sampling
def process_before_every_sampling(p, *args, **kwargs) -> None:
    state = get_state(p)
    if state is None or (state.options is None and state.error is None):
        return
    context = sampling.SamplingContext()
    try:
        denoiser = sampling.sampler_denoiser(p)
    except Exception as error:  # noqa: BLE001
        state.error = error
        return
    sampling.bind(denoiser, context)
    state.context = context
    state.release()  # the previous pass's processors (hires fix: first pass)
    if state.error is not None:
        context.error = state.error
        return
    try:
        _prepare_pass(p, state, context, kwargs.get("x"), denoiser)
    except Exception as error:  # noqa: BLE001 - raised by the forward / p.sample
        state.release()
        context.error = error
        state.error = error


def _extractor(options: ColorizeOptions):
    from lib_colorize.extractors import extract_lines

    def extract(image, size):
        return extract_lines(options.line_extractor, image, size, models_dir=model.models_dir(),
                             device=model.compute_device(), progress=model.download_progress)

    return extract


def batch_seeds(p, batch: int) -> list:
    """The seeds of the images being sampled: ``p.seeds`` holds the current batch's (the webui sets it per
    ``n_iter`` batch), so image ``i`` of any batch gets what a generation of it alone would."""
    seeds = [int(s) for s in (getattr(p, "seeds", None) or [])][:batch]
    if len(seeds) < batch:
        base = seeds[0] if seeds else int(getattr(p, "seed", 0))
        seeds = [base + i for i in range(batch)]
    return seeds


def _prepare_pass(p, state: GenerationState, context: sampling.SamplingContext, x, denoiser) -> None:
    sd_model, unet = _unet_of(p)
    if x is None:
        raise RuntimeError("ColorizeDiffusion: process_before_every_sampling got no latent")
    from modules import devices

    conflicts.report(p, conflicts.detect(p, unet, denoiser, state.options))
    # x lives where the U-Net computes (also under --lowvram)
    plan, processors = prepare_pass(p, state, x, unet, model.sketch_encoder(sd_model),
                                    lambda image: model.first_stage_posterior(sd_model, image),
                                    vae_dtype=getattr(devices, "dtype_vae", torch.float32),
                                    device=x.device, dtype=model.unet_input_dtype())
    context.plan, context.processors = plan, processors


def _pass_sketch(p, options: ColorizeOptions, size: tuple, extractor, *, xl: bool = False):
    """This pass's sketch (1, 3, H, W) and its box, where the pass's image has its content.

    A hires pass whose size has another aspect ratio than the first pass (hires "Resize width/height to") samples
    the first pass upscaled with its aspect kept, to ``(hr_upscale_to_y, hr_upscale_to_x)``, then cut to size: the
    webui drops ``truncate_y // 2`` latent rows at the top and ``truncate_x // 2`` columns at the left. The sketch
    is laid out on that larger canvas and cut the same way, so its lines stay on the first pass's drawing, and the
    box is moved with it.
    """
    from lib_colorize.preprocess import prepare_sketch, shift_box

    height, width = size
    rows = int(getattr(p, "truncate_y", 0) or 0) if getattr(p, "is_hr_pass", False) else 0
    cols = int(getattr(p, "truncate_x", 0) or 0) if getattr(p, "is_hr_pass", False) else 0
    if rows <= 0 and cols <= 0:
        return prepare_sketch(options.sketch, options.sketch_mode, size, extractor, xl=xl)
    rows, cols = max(rows, 0), max(cols, 0)
    top, left = rows // 2 * LATENT_FACTOR, cols // 2 * LATENT_FACTOR
    canvas = (height + rows * LATENT_FACTOR, width + cols * LATENT_FACTOR)
    sketch, box = prepare_sketch(options.sketch, options.sketch_mode, canvas, extractor, xl=xl)
    return sketch[..., top:top + height, left:left + width], shift_box(box, (left, top), (width, height))


def prepare_pass(p, state: GenerationState, x, unet, encoder, vae_encode, *, vae_dtype: torch.dtype,
                 device: torch.device, dtype: torch.dtype):
    """One sampling pass's plan at the size of its latent ``x``, and the processors installed on ``unet``, on any
    host: the sketch (and the injection inputs: ``vae_encode`` maps NCHW [-1, 1] to a posterior) through
    ``encoder``, hints and latents in ``dtype`` on ``device``. Returns ``(plan, processors)``."""
    from lib_colorize.preprocess import reference_for_injection, tensor_to_images

    options, family = state.options, state.info.family
    height, width = int(x.shape[-2]) * 8, int(x.shape[-1]) * 8
    extractor = _extractor(options) if options.sketch_mode == "extract" else None
    sketch, box = _pass_sketch(p, options, (height, width), extractor, xl=family.is_xl)
    injection_reference = None
    if options.injection and options.reference is not None:
        injection_reference = reference_for_injection(options.reference, (height, width))
    if family.is_xl:
        encoder.rope = options.sketch_rope
    with model.on_device(encoder):
        sketch_hints, blank_hints, injection_hints = conditioning.encode_sketch_hints(
            encoder, sketch.to(model.compute_device()), options.sketch_strength, injection_reference,
            options.injection_sketch_fidelity, state.stats,
            level_strengths=options.sketch_level_strengths if family.is_xl else None)

    def to_unet(tensors):
        return None if tensors is None else [t.to(device=device, dtype=dtype) for t in tensors]

    injection = None
    if injection_reference is not None:
        vae_input = injection_reference.to(device=device, dtype=vae_dtype)
        injection = conditioning.build_injection(options, vae_encode, vae_input,
                                                 to_unet(injection_hints), batch_seeds(p, int(x.shape[0])),
                                                 dtype=dtype, device=device, latent_scale=family.latent_scale)
    tokens, enhance_plan = state.tokens, None
    if options.enhanced:
        from . import enhance

        enhance_plan, tokens = enhance.prepare(p, options, sketch, box, state.tokens,
                                               batch_seeds(p, int(x.shape[0])), (height, width), device, dtype)
    # XL: y of this pass's size (the hires pass has its own), on every row of every call (method-xl §2.2)
    vector = conditioning.xl_vector(height, width).to(device=device, dtype=dtype) if family.is_xl else None
    plan = conditioning.build_plan(options, sketch_hints=to_unet(sketch_hints), blank_hints=to_unet(blank_hints),
                                   tokens=tokens, injection=injection, vector=vector, enhance=enhance_plan)
    processors = unet_processors.for_generation(unet, layer_scales=state.scales, injection=injection is not None,
                                                enhance=enhance_plan, hint_blocks=family.hint_blocks).install()
    state.processors = processors
    state.passes += 1
    state.box, state.box_canvas = box, (width, height)
    if state.first_size is None:
        state.first_size = (width, height)
        if options.return_sketch:
            state.sketch_preview = tensor_to_images(sketch)[0]
        if options.return_masks and enhance_plan is not None:
            state.mask_previews = enhance_plan.inputs.previews(options)
    return plan, processors


# ------------------------------------------------------------------------------------------------ postprocess
def postprocess_image(p, pp, *args) -> None:
    state = get_state(p)
    if state is None or state.options is None or state.error is not None:
        return
    if state.options.remove_background:
        from . import enhance

        pp.image = enhance.remove_background(pp.image, state.options)
    if not state.options.crop_result or state.box is None:
        return
    from lib_colorize.preprocess import crop_to_box

    width, height = state.box_canvas
    pp.image = crop_to_box(pp.image, state.box, scale=(pp.image.width / width, pp.image.height / height))


def postprocess(p, processed, *args) -> None:
    state = get_state(p)
    if state is None:
        return
    state.release()
    options = state.options
    if options is None or state.error is not None or not model.setting(model.SETTING_GALLERY, True):
        return
    extra = []
    if options.return_sketch and state.sketch_preview is not None:
        extra.append(state.sketch_preview)
    extra.extend(state.mask_previews)
    if options.return_heatmap and options.manipulations and options.reference is not None:
        try:
            from .api import heatmaps_for_options

            extra.extend(heatmaps_for_options(options))
        except ColorizeError as error:
            print(f"ColorizeDiffusion: no heat map: {error}")
    processed.images.extend(extra)


def on_script_unloaded() -> None:
    unet_processors.remove_all()
    model.uninstall_config_resolver()
