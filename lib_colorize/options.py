"""The one argument object of a colorization: :class:`ColorizeOptions`.

The webui accordion, the HTTP API (``alwayson_scripts.ColorizeDiffusion.args[0]``), the command line and the
infotext all read and write this object, and :data:`FIELDS` is the single table of every option's default,
range, label, tooltip, infotext key and command-line flag. Validation happens here, once, for all of them:
:meth:`ColorizeOptions.from_dict` rejects unknown keys, wrong types, NaN/inf and out-of-range values with an
:class:`~lib_colorize.errors.InvalidInput` that names the field and the allowed range.

Defaults are the mid-2024 research app's (method §12.3). Where each option takes effect:

============================  ==========================================================================
option                        takes effect in
============================  ==========================================================================
enabled                       ``cd_webui.lifecycle.process`` (the CLI is always enabled)
sketch, sketch_mode,          :func:`lib_colorize.preprocess.prepare_sketch` (``extract``:
line_extractor                :func:`lib_colorize.extractors.extract_lines`)
reference                     :func:`lib_colorize.conditioning.reference_tokens` (OpenCLIP tokens)
pad_reference                 :func:`lib_colorize.preprocess.prepare_reference`
reference_guidance,           :func:`lib_colorize.guidance.guidance_mode` (the row groups) and
sketch_guidance               :func:`lib_colorize.guidance.combine`
sketch_strength               :func:`lib_colorize.conditioning.encode_sketch_hints` (``k_ctl · hints``), added
                              by :class:`lib_colorize.processors.SketchHints`
reference_strength,           :func:`lib_colorize.guidance.cross_attention_scales`, applied by
level_scales, layer_scales    :class:`lib_colorize.processors.CrossAttentionScale`
guidance_start/end,           :meth:`lib_colorize.guidance.GuidanceWindow.is_open`, per denoiser call
no_guidance_start/end         (:func:`lib_colorize.denoiser.guided_call`)
injection                     :func:`lib_colorize.processors.for_generation` (the bank processors) and
                              :func:`lib_colorize.denoiser.reference_pass`
injection_start               :func:`lib_colorize.denoiser.guided_call` (a reference pass only when τ ≥ τ₀)
injection_reference_fidelity  :class:`lib_colorize.processors.ReferenceBankRead` (the φ-blend)
injection_sketch_fidelity     :func:`lib_colorize.conditioning.encode_sketch_hints` (``κ`` on the reference's
                              hints)
crop_result                   :func:`lib_colorize.preprocess.crop_to_box`
manipulations                 :func:`lib_colorize.manipulation.apply_manipulations`
return_sketch, return_heatmap extra output images: ``Colorizer.colorize``, ``cd_webui.lifecycle.postprocess``
style_enhance, bg_enhance,    :func:`lib_colorize.enhance.prepare_enhance` (per version: contexts, LoRA sides,
fg_enhance                    encoders; method-enhance §5-§7), applied by the processors of
                              :mod:`lib_colorize.processors.enhance`; refused for a version that lacks them by
                              :func:`lib_colorize.enhance.check_version`
background                    :func:`lib_colorize.enhance.prepare_enhance` (bg tokens / encoder input)
foreground_strength,          :class:`lib_colorize.processors.SplitCrossAttention` (β_f, β_b on each pass, μ the
background_strength,          merge); merging_scale also blends the style vectors
merging_scale                 (:func:`lib_colorize.enhance.style_modulations`)
background_factor             :func:`lib_colorize.enhance.background_hints` (κ·hs_bg), warped in by
                              :class:`lib_colorize.processors.SkipWarp`
sketch_mask_threshold         τ_s: :class:`~lib_colorize.processors.SplitCrossAttention`, ``SkipWarp``, v1.5's
                              threshold embedding (:func:`lib_colorize.enhance.prepare_enhance`)
reference_mask_threshold      τ_r: :func:`lib_colorize.masks.whiten_where` (masked reference, remove foreground /
                              background), v1.5's threshold embedding
reference_mask_extractor      :func:`lib_colorize.masks.load_mask_extractor`, called by ``prepare_mask_inputs``
sketch_mask, reference_mask   user masks instead of extraction: :func:`lib_colorize.enhance.prepare_mask_inputs`
remove_foreground             :func:`lib_colorize.enhance.prepare_mask_inputs` (the background image)
remove_background             :func:`lib_colorize.enhance.remove_background` (after decoding)
return_masks                  extra output images (the masks used): ``Colorizer.colorize``, ``cd_webui``
sketch_strength_1..4 (XL)     :func:`lib_colorize.conditioning.encode_sketch_hints` (``a_k = k_ctl · s_k``,
                              method-xl §2.3)
sketch_rope (XL)              the XL sketch encoder's rotary positions
                              (:class:`lib_colorize.models.sketch_encoder_xl.SketchEncoderXL`)
============================  ==========================================================================

Some options only exist for some models (:data:`VERSION_ONLY`): the XL models have no text manipulation, no
per-layer scales and no middle (sdxl: no low) level scale (method-xl §5.4, §5.7); the SD2.1 models have no
per-level sketch strengths. A non-default value of an option the loaded model does not use is refused
(:meth:`ColorizeOptions.check_version`); the UI hides them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import InvalidInput
from .family import SD21_VERSIONS, XL_VERSIONS

SKETCH_MODES = ("none", "invert", "extract")
LINE_EXTRACTORS = ("lineart_keras", "lineart", "lineart_denoise", "lineart_standard")
LEVEL_NAMES = ("encoder", "middle", "low")
NUM_ATTENTION_LAYERS = 16
DEFAULT_THRESHOLDS = (0.5, 0.55, 0.65, 0.95)
MAX_MANIPULATIONS = 16
MAX_PROMPT_CHARS = 1000
DEFAULT_MAX_IMAGE_SIDE = 4096
#: (minimum, maximum, step) of every cross-attention scale: level scales and the 16 layer scales (method §4.3).
SCALE_RANGE = (0.0, 1.0, 0.05)
#: The XL sketch encoder's rotary-position forms (method-xl §4, §12 #17); the default is the original app's.
SKETCH_ROPE_MODES = ("cos", "rotation")
SKETCH_LEVEL_FIELDS = tuple(f"sketch_strength_{k}" for k in range(1, 5))


@dataclass(frozen=True)
class FieldSpec:
    """One scalar option: how it is validated, shown, written to infotext and named on the command line."""

    name: str
    kind: type
    default: Any
    label: str
    tooltip: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: Optional[tuple] = None
    infotext: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _spec(name, kind, default, label, tooltip, minimum=None, maximum=None, step=None, choices=None,
          infotext=None) -> FieldSpec:
    return FieldSpec(name, kind, default, label, tooltip, minimum, maximum, step, choices, infotext)


#: What the window and start options measure (method §5.4): the U-Net timestep's progress, not the step count.
PROGRESS_NOTE = ("Progress is 1 - t/999 of the U-Net timestep t (0 at the first step, 1 at the last), not the "
                 "fraction of steps: with 20 Karras steps 0.5 comes at step 10 but 0.9 only at step 15.")


#: Scalar options, in the order the accordion shows them. Structured options (images, level_scales,
#: layer_scales, manipulations) are described by :data:`STRUCTURED_FIELDS`.
FIELDS: tuple[FieldSpec, ...] = (
    _spec("enabled", bool, False, "Enable ColorizeDiffusion",
          "Colorize the sketch after the reference. Needs a ColorizeDiffusion checkpoint selected in the webui."),
    _spec("sketch_mode", str, "invert", "Sketch preprocessor",
          "How the sketch becomes line art. invert: black lines on white paper (most drawings). none: already "
          "white lines on black. extract: a learned line extractor cleans up pencil, scans, manga pages or "
          "coloured images first.",
          choices=SKETCH_MODES, infotext="CD sketch mode"),
    _spec("line_extractor", str, "lineart_keras", "Line extractor",
          "Used when the sketch preprocessor is 'extract'. lineart_keras is the original app's default; "
          "lineart_standard needs no model file.",
          choices=LINE_EXTRACTORS, infotext="CD line extractor"),
    _spec("reference_guidance", float, 5.0, "Reference guidance scale",
          "How strongly colours follow the reference. 1 turns reference guidance off (saves one U-Net pass).",
          1.0, 15.0, 0.5, infotext="CD reference guidance"),
    _spec("sketch_guidance", float, 1.0, "Sketch guidance scale",
          "How strongly the result follows the sketch's lines. 1 turns sketch guidance off (saves one U-Net "
          "pass).", 1.0, 5.0, 0.1, infotext="CD sketch guidance"),
    _spec("sketch_strength", float, 1.0, "Sketch strength",
          "Multiplies the sketch encoder's features. Lower lets the model draw more freely.",
          0.0, 3.0, 0.1, infotext="CD sketch strength"),
    _spec("reference_strength", float, 1.0, "Reference strength",
          "Overall cross-attention scale on the reference: multiplies the encoder, middle and low level scales. "
          "Layers 6 (middle block) and 13-15 (up0) belong to no level and ignore it, and so do the 16 per-layer "
          "sliders.",
          0.0, 1.0, 0.05, infotext="CD reference strength"),
    _spec("pad_reference", float, 1.0, "Pad reference with margin",
          "Pads the reference with white margins left and right (width x this factor) before encoding, which "
          "suppresses background colours leaking in. 1 = off.", 1.0, 2.0, 0.05, infotext="CD pad reference"),
    _spec("guidance_start", float, 0.0, "Reference start",
          "Sampling progress before which the reference is not used at all. " + PROGRESS_NOTE,
          0.0, 1.0, 0.05, infotext="CD guidance start"),
    _spec("guidance_end", float, 1.0, "Reference end",
          "Sampling progress after which the reference is not used any more. " + PROGRESS_NOTE,
          0.0, 1.0, 0.05, infotext="CD guidance end"),
    _spec("no_guidance_start", float, -0.05, "No-reference window start",
          "Sampling progress at which a window without the reference starts. Negative values (default) disable "
          "the window. " + PROGRESS_NOTE,
          -0.05, 1.0, 0.05, infotext="CD no guidance start"),
    _spec("no_guidance_end", float, -0.05, "No-reference window end",
          "Sampling progress at which the no-reference window ends. " + PROGRESS_NOTE, -0.05, 1.0, 0.05,
          infotext="CD no guidance end"),
    _spec("injection", bool, False, "Attention injection",
          "Also runs the reference image through the U-Net and lets the drawing attend to it: closer colours "
          "and textures, about twice the sampling time.", infotext="CD injection"),
    _spec("injection_reference_fidelity", float, 0.5, "Injection fidelity (reference)",
          "With reference guidance on: 1 keeps injection out of the reference-free branch (strongest "
          "effect), 0 injects everywhere.", 0.0, 1.0, 0.05, infotext="CD injection reference fidelity"),
    _spec("injection_sketch_fidelity", float, 0.0, "Injection fidelity (sketch)",
          "How much of the reference's own shapes the injection pass sees (sketch features of the inverted "
          "reference). 0 = none.", 0.0, 2.0, 0.05, infotext="CD injection sketch fidelity"),
    _spec("injection_start", float, 0.0, "Injection start",
          "Sampling progress before which no injection happens. " + PROGRESS_NOTE, 0.0, 1.0, 0.05,
          infotext="CD injection start"),
    _spec("crop_result", bool, False, "Crop result",
          "Crop the output to the sketch's own aspect ratio (removes the padding added to fit the canvas).",
          infotext="CD crop result"),
    _spec("return_sketch", bool, False, "Show processed sketch",
          "Add the line art the model actually sees to the outputs."),
    _spec("return_heatmap", bool, False, "Show manipulation heat map",
          "Add the reference's manipulation heat map to the outputs."),
    # ---------------------------------------------------------------- enhance modes (method-enhance §1)
    _spec("style_enhance", bool, False, "Style enhance",
          "v2 only: a style encoder turns the reference (blended with the background image by the merging "
          "scale) into a scale and shift after every decoder block.", infotext="CD style enhance"),
    _spec("bg_enhance", bool, False, "BG enhance (mask guided)",
          "Separates character and background with masks: the character follows the reference, the background "
          "follows the reference's background (or the background image). v1 training-free; v1.5 with its "
          "background LoRA and tokens; v2 also warps the background encoder's features in. On the XL models "
          "this is the authors' 'Low-level injection' (xlv2 adds its background LoRA and ReferenceNet).",
          infotext="CD BG enhance"),
    _spec("fg_enhance", bool, False, "FG enhance (mask guided)",
          "v1.5 and v2: mask-guided split attention for the character only (its authors call it of little use "
          "with the released models).", infotext="CD FG enhance"),
    _spec("foreground_strength", float, 1.0, "Foreground strength",
          "Multiplies the character's cross-attention in BG/FG enhance.", 0.0, 1.0, 0.05,
          infotext="CD foreground strength"),
    _spec("background_strength", float, 1.0, "Background strength",
          "Multiplies the background's cross-attention in BG/FG enhance.", 0.0, 1.0, 0.05,
          infotext="CD background strength"),
    _spec("merging_scale", float, 0.0, "Merging scale",
          "Mixes background attention into the character (0 = none); with style enhance and a background "
          "image, blends the reference's style towards the background's.", 0.0, 1.0, 0.05,
          infotext="CD merging scale"),
    _spec("background_factor", float, 1.0, "Background factor",
          "v2 BG enhance: multiplies the background encoder's features (0 still runs the warp modules).",
          0.0, 2.0, 0.05, infotext="CD background factor"),
    _spec("reference_mask_threshold", float, 0.5, "Reference mask threshold",
          "Where the reference (or background, or result) mask counts as character.", 0.0, 1.0, 0.01,
          infotext="CD reference mask threshold"),
    _spec("sketch_mask_threshold", float, 0.05, "Sketch mask threshold",
          "Where the sketch mask counts as character in the split attention (and v2's warp).", 0.0, 1.0, 0.01,
          infotext="CD sketch mask threshold"),
    _spec("reference_mask_extractor", str, "ISNet", "Reference mask extractor",
          "ISNet (Apache-2.0, downloaded automatically) or rmbg-v2 (BRIA RMBG-2.0: gated on the Hub, "
          "non-commercial licence; download it yourself after accepting BRIA's terms).",
          choices=("ISNet", "rmbg-v2"), infotext="CD reference mask extractor"),
    _spec("remove_foreground", bool, False, "Remove foreground in background input",
          "Whitens the character out of the background image before it is used.", infotext="CD remove foreground"),
    _spec("remove_background", bool, False, "Remove background in result",
          "Whitens the result outside the character (reference mask extractor on the result).",
          infotext="CD remove background"),
    _spec("return_masks", bool, False, "Show masks",
          "Add the sketch and reference masks the model used to the outputs."),
    # ---------------------------------------------------------------- XL models only (method-xl §2.3, §4)
    *(_spec(name, float, 1.0, f"Sketch strength {k}",
            f"XL: multiplies the sketch encoder's level-{k} features (level 1 is the finest), on top of the "
            "sketch strength.", 0.0, 3.0, 0.05, infotext=f"CD sketch strength {k}")
      for k, name in enumerate(SKETCH_LEVEL_FIELDS, start=1)),
    _spec("sketch_rope", str, "cos", "Sketch encoder positions",
          "XL: the sketch encoder's rotary positions. cos is what the authors' app computes (its fp16 cast "
          "keeps only the cosine of the rotation); rotation is the full rotation the encoder was presumably "
          "trained with.", choices=SKETCH_ROPE_MODES, infotext="CD sketch rope"),
)

FIELD_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in FIELDS}

#: Options that are not plain scalars, with a one-line description each (API docs, CLI help).
STRUCTURED_FIELDS: dict[str, str] = {
    "sketch": "the line art: base64 PNG/JPEG (API), image (UI), file (CLI). Required when enabled.",
    "reference": "the colour reference image; base64 (API), image (UI), file (CLI).",
    "background": "a background image for BG / style enhance instead of the reference's own background; base64 "
                  "(API), image (UI), file (CLI).",
    "sketch_mask": "the character mask of the sketch (white = character) instead of ISNet-sketch; base64 (API), "
                   "image (UI), file (CLI).",
    "reference_mask": "the character mask of the reference (white = character) instead of the reference mask "
                      "extractor; base64 (API), image (UI), file (CLI).",
    "level_scales": "{encoder, middle, low} cross-attention scales in [0, 1], each times reference_strength.",
    "layer_scales": "16 numbers in [0, 1], one per cross-attention layer (overrides level_scales), or null.",
    "manipulations": f"list of at most {MAX_MANIPULATIONS} {{target, anchor, control, scale, enhance, "
                     "thresholds[4]}} groups applied in order to the reference tokens.",
}

ALL_KEYS = tuple(f.name for f in FIELDS) + tuple(STRUCTURED_FIELDS)
#: Options that hold images (decoded PIL images; base64 in the API).
IMAGE_FIELDS = ("sketch", "reference", "background", "sketch_mask", "reference_mask")


@dataclass(frozen=True)
class LevelScales:
    """Cross-attention scales by U-Net level (method §4.3 level control). Each is multiplied by
    ``reference_strength``; blocks 6 and 13-15 are not part of any level and stay at 1."""

    encoder: float = 1.0
    middle: float = 1.0
    low: float = 1.0


@dataclass(frozen=True)
class Manipulation:
    """One text-manipulation group (method §7.1).

    Shifts the reference tokens most similar to ``control`` towards ``target`` (away from ``anchor``) by an
    amount set by ``scale``; ``thresholds`` (strictly increasing in (0, 1)) shape how similarity maps to
    weight (§7.3). Empty prompts are the literal ``"none"``.
    """

    target: str = "none"
    anchor: str = "none"
    control: str = "none"
    scale: float = 0.0
    enhance: bool = False
    thresholds: tuple = DEFAULT_THRESHOLDS

    @property
    def has_anchor(self) -> bool:
        return self.anchor.strip() not in ("", "none")


MANIPULATION_KEYS = tuple(f.name for f in dataclasses.fields(Manipulation))


@dataclass(frozen=True)
class ColorizeOptions:
    """Every user option of a colorization (see :data:`FIELDS` for ranges and meaning).

    ``sketch`` and ``reference`` hold decoded ``PIL.Image`` objects (or ``None``).
    """

    enabled: bool = False
    sketch: Any = None
    reference: Any = None
    sketch_mode: str = "invert"
    line_extractor: str = "lineart_keras"
    reference_guidance: float = 5.0
    sketch_guidance: float = 1.0
    sketch_strength: float = 1.0
    reference_strength: float = 1.0
    level_scales: LevelScales = LevelScales()
    layer_scales: Optional[tuple] = None
    pad_reference: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    no_guidance_start: float = -0.05
    no_guidance_end: float = -0.05
    injection: bool = False
    injection_reference_fidelity: float = 0.5
    injection_sketch_fidelity: float = 0.0
    injection_start: float = 0.0
    crop_result: bool = False
    manipulations: tuple = ()
    return_sketch: bool = False
    return_heatmap: bool = False
    style_enhance: bool = False
    bg_enhance: bool = False
    fg_enhance: bool = False
    foreground_strength: float = 1.0
    background_strength: float = 1.0
    merging_scale: float = 0.0
    background_factor: float = 1.0
    reference_mask_threshold: float = 0.5
    sketch_mask_threshold: float = 0.05
    reference_mask_extractor: str = "ISNet"
    remove_foreground: bool = False
    remove_background: bool = False
    return_masks: bool = False
    background: Any = None
    sketch_mask: Any = None
    reference_mask: Any = None
    sketch_strength_1: float = 1.0
    sketch_strength_2: float = 1.0
    sketch_strength_3: float = 1.0
    sketch_strength_4: float = 1.0
    sketch_rope: str = "cos"

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, decode_image: Optional[Callable[[Any, str], Any]] = None,
                  max_image_side: int = DEFAULT_MAX_IMAGE_SIDE, require_sketch: bool = True) -> "ColorizeOptions":
        """Validate a dict of API keys (omitted keys take the defaults) into options.

        ``decode_image(value, field)`` turns an API/UI image value into a PIL image (default:
        :func:`lib_colorize.images.decode_image`). ``require_sketch=False`` lets a caller supply the sketch
        later (img2img uses its init image).
        """
        if not isinstance(data, Mapping):
            raise InvalidInput("args", f"expected a JSON object with keys {', '.join(ALL_KEYS)}; got "
                                       f"{type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in ALL_KEYS)
        if unknown:
            raise InvalidInput(unknown[0], f"unknown option(s) {', '.join(unknown)}; valid keys: "
                                           f"{', '.join(ALL_KEYS)}")
        if decode_image is None:
            from .images import decode_image as decode_image
        values: dict[str, Any] = {}
        for spec in FIELDS:
            if spec.name in data and data[spec.name] is not None:
                values[spec.name] = coerce_scalar(spec, data[spec.name])
        for name in IMAGE_FIELDS:
            if data.get(name) is not None:
                image = decode_image(data[name], name)
                check_image_size(image, name, max_image_side)
                values[name] = image
        if data.get("level_scales") is not None:
            values["level_scales"] = parse_level_scales(data["level_scales"])
        if data.get("layer_scales") is not None:
            values["layer_scales"] = parse_layer_scales(data["layer_scales"])
        if data.get("manipulations") is not None:
            values["manipulations"] = parse_manipulations(data["manipulations"])
        options = cls(**values)
        options.check(require_sketch=require_sketch)
        return options

    def check(self, *, require_sketch: bool = True) -> None:
        """Cross-field checks (single fields were checked while parsing)."""
        if not self.enabled:
            return
        if require_sketch and self.sketch is None:
            raise InvalidInput("sketch", "ColorizeDiffusion is enabled but no sketch was given")
        if self.guidance_start > self.guidance_end:
            raise InvalidInput("guidance_start", f"must not exceed guidance_end ({self.guidance_start} > "
                                                 f"{self.guidance_end}): the reference would never be used")
        if self.no_guidance_start > self.no_guidance_end:
            raise InvalidInput("no_guidance_start", f"must not exceed no_guidance_end "
                                                    f"({self.no_guidance_start} > {self.no_guidance_end})")
        if not require_sketch:
            return   # the images come later (a pasted infotext, img2img's init image): checked then
        if self.bg_enhance and self.reference is None and self.background is None:
            raise InvalidInput("bg_enhance", "BG enhance needs a reference image or a background image")
        if self.style_enhance and self.reference is None:
            raise InvalidInput("style_enhance", "style enhance needs a reference image")
        if self.remove_foreground and self.background is None:
            raise InvalidInput("remove_foreground", "'Remove foreground in background input' needs a background "
                                                    "image")

    @property
    def mask_guided(self) -> bool:
        """BG or FG enhance: the split cross-attention over a sketch mask runs (method-enhance §3.3)."""
        return self.bg_enhance or self.fg_enhance

    @property
    def enhanced(self) -> bool:
        """Any enhance mode (style, BG or FG)."""
        return self.style_enhance or self.mask_guided

    def check_version(self, version: str) -> None:
        """Refuse options that the model ``version`` does not use (see :data:`VERSION_ONLY`), when they are not
        at their defaults: an :class:`InvalidInput` naming the option and the models it applies to."""
        if not self.enabled:
            return
        for name, versions in VERSION_ONLY.items():
            if version in versions:
                continue
            value, default = _option_value(self, name), _option_default(name)
            if value != default:
                raise InvalidInput(name, f"applies to {_version_names(versions)} models only; the loaded model is "
                                         f"{version} (leave it at {default!r})")

    @property
    def sketch_level_strengths(self) -> tuple:
        """(s₁, s₂, s₃, s₄) of the XL sketch encoder's four levels."""
        return tuple(getattr(self, name) for name in SKETCH_LEVEL_FIELDS)

    def replace(self, **changes: Any) -> "ColorizeOptions":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- derived views
    @property
    def active_manipulations(self) -> tuple:
        """Groups to apply: all of them, but only if some target scale is > 0 (method §7, check_manipulate)."""
        return self.manipulations if any(m.scale > 0 for m in self.manipulations) else ()

    def to_dict(self, *, include_images: bool = False) -> dict:
        """API-key dict of the options (images left out unless asked; they are PIL objects)."""
        out: dict[str, Any] = {spec.name: getattr(self, spec.name) for spec in FIELDS}
        out["level_scales"] = dataclasses.asdict(self.level_scales)
        out["layer_scales"] = list(self.layer_scales) if self.layer_scales is not None else None
        out["manipulations"] = [dict(dataclasses.asdict(m), thresholds=list(m.thresholds))
                                for m in self.manipulations]
        if include_images:
            for name in IMAGE_FIELDS:
                out[name] = getattr(self, name)
        return out


# ---------------------------------------------------------------------- options per model version
_SD21, _XL = SD21_VERSIONS, XL_VERSIONS

#: Options (or ``level_scales.<level>``) that only some model versions use; every other option applies to all.
VERSION_ONLY: dict[str, tuple[str, ...]] = {
    "layer_scales": _SD21, "manipulations": _SD21, "return_heatmap": _SD21,
    "level_scales.middle": _SD21, "level_scales.low": _SD21 + ("xlv2",),
    **{name: _XL for name in SKETCH_LEVEL_FIELDS}, "sketch_rope": _XL,
}


def applies_to(name: str, version: Optional[str]) -> bool:
    """Whether option ``name`` does something on model ``version`` (None: unknown, everything shown)."""
    return version is None or version in VERSION_ONLY.get(name, (version,))


def _option_value(options: "ColorizeOptions", name: str) -> Any:
    if name.startswith("level_scales."):
        return getattr(options.level_scales, name.split(".", 1)[1])
    return getattr(options, name)


def _option_default(name: str) -> Any:
    return _option_value(ColorizeOptions(), name)


def _version_names(versions: Sequence[str]) -> str:
    return "SD2.1-based (v1, v1.5, v2)" if tuple(versions) == _SD21 else \
        "XL (sdxl, xlv2)" if tuple(versions) == _XL else ", ".join(versions)


# ---------------------------------------------------------------------- field parsers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, minimum: Optional[float], maximum: Optional[float]) -> float:
    """A finite real number within [minimum, maximum]; strings holding a number are accepted (UI/infotext)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidInput(name, f"expected a number, got {value!r}") from None
    if not _is_number(value):
        raise InvalidInput(name, f"expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInput(name, f"must be a finite number, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidInput(name, f"{_exact(value)} is out of range [{_exact(minimum)}, {_exact(maximum)}]")
    return value


def _exact(value: float) -> str:
    """A number as short as it reads, but never rounded onto a different one (2.0000001 is not "2")."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidInput(name, f"expected true or false, got {value!r}")


def coerce_scalar(spec: FieldSpec, value: Any) -> Any:
    """Validate one scalar option against its :class:`FieldSpec`."""
    if spec.kind is bool:
        return check_bool(spec.name, value)
    if spec.kind is float:
        return check_number(spec.name, value, spec.minimum, spec.maximum)
    if not isinstance(value, str):
        raise InvalidInput(spec.name, f"expected a string, got {type(value).__name__}")
    if spec.choices is not None and value not in spec.choices:
        raise InvalidInput(spec.name, f"{value!r} is not one of {', '.join(spec.choices)}")
    return value


def parse_level_scales(value: Any) -> LevelScales:
    if isinstance(value, LevelScales):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(LEVEL_NAMES):
            raise InvalidInput("level_scales", f"expected {len(LEVEL_NAMES)} numbers (encoder, middle, low)")
        value = dict(zip(LEVEL_NAMES, value))
    if not isinstance(value, Mapping):
        raise InvalidInput("level_scales", "expected an object {encoder, middle, low}")
    unknown = sorted(set(value) - set(LEVEL_NAMES))
    if unknown:
        raise InvalidInput("level_scales", f"unknown key(s) {', '.join(map(str, unknown))}; valid: "
                                           f"{', '.join(LEVEL_NAMES)}")
    return LevelScales(**{k: check_number(f"level_scales.{k}", value[k], *SCALE_RANGE[:2]) for k in value})


def parse_layer_scales(value: Any) -> Optional[tuple]:
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",") if v.strip()]
    if not isinstance(value, Sequence):
        raise InvalidInput("layer_scales", f"expected {NUM_ATTENTION_LAYERS} numbers or null")
    if len(value) != NUM_ATTENTION_LAYERS:
        raise InvalidInput("layer_scales", f"expected {NUM_ATTENTION_LAYERS} numbers, got {len(value)}")
    return tuple(check_number(f"layer_scales[{i}]", v, *SCALE_RANGE[:2]) for i, v in enumerate(value))


def check_thresholds(name: str, value: Any) -> tuple:
    """Four thresholds strictly increasing inside (0, 1) (method §7.3)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 4:
        raise InvalidInput(name, "expected 4 numbers")
    ts = tuple(check_number(name, v, None, None) for v in value)
    if not (0.0 < ts[0] < ts[1] < ts[2] < ts[3] < 1.0):
        raise InvalidInput(name, f"must be strictly increasing inside (0, 1), got {list(ts)}")
    return ts


def _check_prompt(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if not isinstance(value, str):
        raise InvalidInput(name, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInput(name, f"is {len(value)} characters long; at most {MAX_PROMPT_CHARS}")
    return value.strip() or "none"


def parse_manipulation(value: Any, index: int = 0) -> Manipulation:
    name = f"manipulations[{index}]"
    if isinstance(value, Manipulation):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise InvalidInput(name, "expected an object {target, anchor, control, scale, enhance, thresholds}")
    unknown = sorted(str(k) for k in value if k not in MANIPULATION_KEYS)
    if unknown:
        raise InvalidInput(name, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(MANIPULATION_KEYS)}")
    return Manipulation(
        target=_check_prompt(f"{name}.target", value.get("target")),
        anchor=_check_prompt(f"{name}.anchor", value.get("anchor")),
        control=_check_prompt(f"{name}.control", value.get("control")),
        scale=check_number(f"{name}.scale", value.get("scale", 0.0), 0.0, 15.0),
        enhance=check_bool(f"{name}.enhance", value.get("enhance", False)),
        thresholds=check_thresholds(f"{name}.thresholds", value.get("thresholds", DEFAULT_THRESHOLDS)),
    )


def parse_manipulations(value: Any) -> tuple:
    if isinstance(value, Mapping) or isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidInput("manipulations", "expected a list of manipulation groups")
    if len(value) > MAX_MANIPULATIONS:
        raise InvalidInput("manipulations", f"{len(value)} groups given; at most {MAX_MANIPULATIONS}")
    return tuple(parse_manipulation(v, i) for i, v in enumerate(value))


def check_image_size(image: Any, name: str, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(name, f"image is empty ({width}x{height} px)")
    if max(width, height) > max_side:
        raise InvalidInput(name, f"image is {width}x{height} px; the longest side may be at most {max_side} px")


def check_prompt_tokens(options: ColorizeOptions, count_tokens: Callable[[str], int], limit: int = 75) -> None:
    """Reject manipulation prompts longer than the text encoder's context (77 tokens incl. start/end)."""
    for i, group in enumerate(options.manipulations):
        for key in ("target", "anchor", "control"):
            text = getattr(group, key)
            n = count_tokens(text)
            if n > limit:
                raise InvalidInput(f"manipulations[{i}].{key}",
                                   f"prompt is {n} tokens long; the text encoder takes at most {limit}")
