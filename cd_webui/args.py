"""Script args -> :class:`~lib_colorize.options.ColorizeOptions`, for every way they can arrive.

:func:`parse_script_args` accepts

(a) the **named form** (recommended for API clients): ``args[0]`` is a dict of API keys
    (:data:`lib_colorize.options.ALL_KEYS`, plus ``use_init_image`` for img2img); the remaining positions are
    ignored (the webui fills them with UI defaults);
(b) the **positional form**: the values of :func:`cd_webui.ui.build_ui`'s components in the order of
    :data:`UI_ORDER`, either as gradio delivers them (PIL images, ``{"image", "mask"}`` dicts) or as API JSON
    (base64 strings); missing trailing positions take their defaults;
(c) **overrides** set on ``p`` by other scripts (the X/Y/Z plot): ``p.cd_<key>`` for any API key and
    ``p.cd_level_scales_<encoder|middle|low>`` for one level scale. They win over (a) and (b).

Everything is validated once, by :meth:`ColorizeOptions.from_dict`; a bad value raises
:class:`~lib_colorize.errors.InvalidInput` naming the option (API key, ``level_scales.encoder``,
``layer_scales[3]``, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from lib_colorize.errors import InvalidInput
from lib_colorize.guidance import level_layers
from lib_colorize.images import decode_image
from lib_colorize.manipulation import parse_manipulation_sequence
from lib_colorize.options import (ALL_KEYS, DEFAULT_THRESHOLDS, FIELDS, IMAGE_FIELDS, LEVEL_NAMES,
                                  NUM_ATTENTION_LAYERS, SCALE_RANGE, SKETCH_LEVEL_FIELDS, ColorizeOptions,
                                  LevelScales, check_bool, check_prompt_tokens, parse_level_scales)

__all__ = ["UI_ORDER", "ENHANCE_SLOTS", "SLOT_INDEX", "LEVEL_SLOTS", "LAYER_SLOTS", "ACCURATE_SLOT",
           "USE_INIT_IMAGE_SLOT", "MANIPULATIONS_SLOT", "INFOTEXT_ENABLED_SLOT", "FORM_SLOTS", "FORM_TARGET_SLOT",
           "form_group", "pasted_enabled", "LEVEL_LABELS", "LAYER_NAMES", "SCALE_RANGE", "OVERRIDE_PREFIX",
           "override_attr", "level_override_attr", "parse_script_args", "ui_defaults"]

# ------------------------------------------------------------------------------ the positional order
LEVEL_SLOTS = tuple(f"level_scales.{name}" for name in LEVEL_NAMES)
LAYER_SLOTS = tuple(f"layer_scales[{i}]" for i in range(NUM_ATTENTION_LAYERS))
ACCURATE_SLOT = "accurate_layer_scales"
USE_INIT_IMAGE_SLOT = "use_init_image"
MANIPULATIONS_SLOT = "manipulations"
INFOTEXT_ENABLED_SLOT = "infotext_enabled"
#: The manipulation form: the group being edited, appended to the sequence when its target is not empty (the
#: original app's rule, method §12.2 row 6), so the form takes effect without "Add".
FORM_KEYS = ("target", "anchor", "control", "scale", "enhance")
FORM_SLOTS = tuple(f"form.{key}" for key in FORM_KEYS) + tuple(f"form.thresholds[{i}]" for i in range(4))
FORM_TARGET_SLOT = FORM_SLOTS[0]

#: The enhance section's slots (:mod:`cd_webui.enhance_ui`), appended after the manipulation sequence.
ENHANCE_SLOTS = ("style_enhance", "bg_enhance", "fg_enhance", "background", "sketch_mask", "reference_mask",
                 "foreground_strength", "background_strength", "merging_scale", "background_factor",
                 "reference_mask_threshold", "sketch_mask_threshold", "reference_mask_extractor",
                 "remove_foreground", "remove_background", "return_masks")

#: The positional API: one name per component returned by ``build_ui``, in order. APPEND ONLY.
#:
#: ``use_init_image`` exists (hidden, ignored) in txt2img too, so both tabs share one order.
#: ``accurate_layer_scales`` switches the 16 ``layer_scales[i]`` on; off means ``layer_scales = None``.
#: ``manipulations`` holds the prompt-sequence text (one group per line), or a JSON list of groups (API).
#: ``infotext_enabled`` (hidden) holds ``enabled`` as pasted from an infotext: the API's ``infotext`` field pastes
#: into every slot, then a named dict replaces slot 0, so this is where a dict that omits ``enabled`` finds it.
UI_ORDER: tuple[str, ...] = (
    "enabled", "sketch", "reference", USE_INIT_IMAGE_SLOT, "sketch_mode", "line_extractor",
    "reference_guidance", "sketch_guidance", "sketch_strength", "reference_strength",
    *LEVEL_SLOTS, ACCURATE_SLOT, *LAYER_SLOTS,
    "pad_reference", "guidance_start", "guidance_end", "no_guidance_start", "no_guidance_end",
    "injection", "injection_reference_fidelity", "injection_sketch_fidelity", "injection_start",
    "crop_result", "return_sketch", "return_heatmap", MANIPULATIONS_SLOT,
    *ENHANCE_SLOTS,
    *SKETCH_LEVEL_FIELDS, "sketch_rope",
    INFOTEXT_ENABLED_SLOT, *FORM_SLOTS,
)
SLOT_INDEX: dict[str, int] = {name: i for i, name in enumerate(UI_ORDER)}

#: The 16 cross-attention layers in U-Net order (method §4.1).
LAYER_NAMES = ("down0.attn0", "down0.attn1", "down1.attn0", "down1.attn1", "down2.attn0", "down2.attn1",
               "middle", "up2.attn0", "up2.attn1", "up2.attn2", "up1.attn0", "up1.attn1", "up1.attn2",
               "up0.attn0", "up0.attn1", "up0.attn2")
assert len(LAYER_NAMES) == NUM_ATTENTION_LAYERS


def _level_tooltip(level: str, what: str) -> str:
    names = ", ".join(LAYER_NAMES[block] for block in level_layers(NUM_ATTENTION_LAYERS)[level])
    return f"Cross-attention scale of the layers {names} ({what}), times reference strength."


#: Labels and tooltips of the level sliders; their range and step are SCALE_RANGE (``parse_level_scales`` /
#: ``parse_layer_scales`` accept [0, 1]; step as in the original app, method §4.3), defaults :class:`LevelScales`.
LEVEL_LABELS = {
    "encoder": ("Encoder scale", _level_tooltip("encoder", "the encoder's highest resolution; its other layers "
                                                           "follow the middle and low scales")),
    "middle": ("Middle-resolution scale (colour)", _level_tooltip("middle", "middle resolution: mostly colour")),
    "low": ("Low-resolution scale (semantics)", _level_tooltip("low", "lowest resolution: mostly semantics")),
}

_SCALARS = tuple(spec.name for spec in FIELDS)
_DICT_EXTRA_KEYS = (USE_INIT_IMAGE_SLOT,)

# ------------------------------------------------------------------------------------ overrides on p
OVERRIDE_PREFIX = "cd_"


def override_attr(key: str) -> str:
    """Attribute of ``p`` that overrides an API key (X/Y/Z axes set it): ``cd_<key>``."""
    if key not in ALL_KEYS:
        raise KeyError(key)
    return OVERRIDE_PREFIX + key


def level_override_attr(level: str) -> str:
    """Attribute of ``p`` that overrides one level scale: ``cd_level_scales_<level>``."""
    if level not in LEVEL_NAMES:
        raise KeyError(level)
    return f"{OVERRIDE_PREFIX}level_scales_{level}"


def ui_defaults() -> dict[str, Any]:
    """Default value of every positional slot (what ``build_ui``'s components start with)."""
    defaults: dict[str, Any] = {spec.name: spec.default for spec in FIELDS}
    defaults.update({name: None for name in IMAGE_FIELDS})
    defaults.update({USE_INIT_IMAGE_SLOT: False, ACCURATE_SLOT: False, MANIPULATIONS_SLOT: "",
                     INFOTEXT_ENABLED_SLOT: False})
    defaults.update({FORM_TARGET_SLOT: "", "form.anchor": "", "form.control": "", "form.scale": 0.0,
                     "form.enhance": False})
    defaults.update({f"form.thresholds[{i}]": value for i, value in enumerate(DEFAULT_THRESHOLDS)})
    levels = LevelScales()
    for name, slot in zip(LEVEL_NAMES, LEVEL_SLOTS):
        defaults[slot] = getattr(levels, name)
    for slot in LAYER_SLOTS:
        defaults[slot] = 1.0
    return {slot: defaults[slot] for slot in UI_ORDER}


# ------------------------------------------------------------------------------------------- parsing
def _values_from_dict(data: Mapping[str, Any]) -> tuple[dict, bool]:
    values = dict(data)
    use_init = False
    if values.get(USE_INIT_IMAGE_SLOT) is not None:
        use_init = check_bool(USE_INIT_IMAGE_SLOT, values[USE_INIT_IMAGE_SLOT])
    for key in _DICT_EXTRA_KEYS:
        values.pop(key, None)
    return values, use_init


def _manipulations_value(value: Any) -> Any:
    if isinstance(value, str):
        return parse_manipulation_sequence(value)
    return value


def form_group(slots: Mapping[str, Any]) -> Optional[dict]:
    """The manipulation form's group (API keys) when its target prompt is not empty, else None."""
    target = slots.get(FORM_TARGET_SLOT)
    if target is None or (isinstance(target, str) and not target.strip()):
        return None
    group = {key: slots.get(f"form.{key}") for key in FORM_KEYS}
    group["thresholds"] = [slots.get(f"form.thresholds[{i}]", DEFAULT_THRESHOLDS[i]) for i in range(4)]
    return {key: value for key, value in group.items() if value is not None}


def pasted_enabled(args: Sequence[Any]) -> Any:
    """``enabled`` as the API's ``infotext`` field pasted it (None when the slot was not sent)."""
    index = SLOT_INDEX[INFOTEXT_ENABLED_SLOT]
    return args[index] if len(args) > index else None


def _values_from_positional(args: Sequence[Any]) -> tuple[dict, bool]:
    if len(args) > len(UI_ORDER):
        raise InvalidInput("args", f"got {len(args)} positional values; ColorizeDiffusion takes at most "
                                   f"{len(UI_ORDER)} (in the order {', '.join(UI_ORDER)}), or one object of "
                                   "named options")
    slots = {name: value for name, value in zip(UI_ORDER, args) if value is not None}
    values: dict[str, Any] = {name: slots[name] for name in _SCALARS + IMAGE_FIELDS if name in slots}
    levels = {name: slots[slot] for name, slot in zip(LEVEL_NAMES, LEVEL_SLOTS) if slot in slots}
    if levels:
        values["level_scales"] = levels
    if check_bool(ACCURATE_SLOT, slots.get(ACCURATE_SLOT, False)):
        values["layer_scales"] = [slots.get(slot, 1.0) for slot in LAYER_SLOTS]
    if MANIPULATIONS_SLOT in slots:
        values["manipulations"] = _manipulations_value(slots[MANIPULATIONS_SLOT])
    group = form_group(slots)
    if group is not None and isinstance(values.get("manipulations", []), (list, tuple)):
        values["manipulations"] = list(values.get("manipulations", [])) + [group]
    use_init = check_bool(USE_INIT_IMAGE_SLOT, slots.get(USE_INIT_IMAGE_SLOT, False))
    return values, use_init


def _apply_overrides(values: dict, p: Any) -> None:
    if p is None:
        return
    for key in ALL_KEYS:
        value = getattr(p, OVERRIDE_PREFIX + key, None)
        if value is not None:
            values[key] = _manipulations_value(value) if key == "manipulations" else value
    single = {level: getattr(p, level_override_attr(level), None) for level in LEVEL_NAMES}
    single = {level: value for level, value in single.items() if value is not None}
    if single:
        current = values.get("level_scales")
        merged = dataclasses.asdict(parse_level_scales(current)) if current is not None else {}
        merged.update(single)
        values["level_scales"] = merged


def _init_image(p: Any) -> Any:
    images = getattr(p, "init_images", None) if p is not None else None
    if not images:
        return None
    return decode_image(images[0], "sketch")


def parse_script_args(args: Sequence[Any], p: Any = None, *, is_img2img: bool = False,
                      require_sketch: Optional[bool] = None) -> ColorizeOptions:
    """Validated options from a script's args (named, positional or UI values) and ``p.cd_*`` overrides.

    With ``is_img2img`` and ``use_init_image`` on, the sketch is ``p.init_images[0]``; without ``p`` the sketch
    is left for the caller to fill (``require_sketch`` then defaults to False). ``require_sketch`` otherwise
    defaults to True: an enabled run without a sketch is rejected.
    """
    args = tuple(args or ())
    if args and isinstance(args[0], Mapping):
        values, use_init = _values_from_dict(args[0])
        if len(args) > 1:
            # The API's "infotext" field pastes into the positional slots and then the named dict replaces slot
            # 0: keys the dict does not name come from those slots (UI defaults unless something was pasted).
            pasted, pasted_use_init = _values_from_positional((None,) + args[1:len(UI_ORDER)])
            for key, value in pasted.items():
                values.setdefault(key, value)
            if USE_INIT_IMAGE_SLOT not in args[0]:
                use_init = pasted_use_init
            if "enabled" not in args[0] and pasted_enabled(args) is not None:
                values["enabled"] = pasted_enabled(args)
    else:
        values, use_init = _values_from_positional(args)
    _apply_overrides(values, p)
    sketch_later = False
    if is_img2img and use_init:
        init = _init_image(p)
        if init is not None:
            values["sketch"] = init
        elif p is None:
            sketch_later = True
        elif values.get("enabled") is True or str(values.get("enabled")).lower() == "true":
            raise InvalidInput("sketch", "'Use init image as sketch' is on but img2img has no init image")
    if require_sketch is None:
        require_sketch = not sketch_later
    options = ColorizeOptions.from_dict(values, require_sketch=require_sketch)
    if options.enabled and options.manipulations:
        from lib_colorize.models.clip import count_tokens

        # tokenizer only: an over-long prompt is refused before the text encoder is loaded
        check_prompt_tokens(options, count_tokens)
    return options
