"""X/Y/Z plot axes for ColorizeDiffusion options.

:func:`register_xyz_axes` adds one axis per numeric option (and one for attention injection) to the webui's
built-in X/Y/Z plot script. Each axis sets ``p.cd_<key>`` (``p.cd_level_scales_<level>`` for a level scale) on
the plot's copy of ``p``; :func:`cd_webui.args.parse_script_args` lets these win over the script args.

Call it when the script module is imported (the webui's own ``scripts/`` load first, and in ``--nowebui`` mode
X/Y/Z builds its axis list before any ``on_before_ui`` callback). It is idempotent: axes already present in the
X/Y/Z module (by label) are not added again, so a "Reload UI" (which re-imports both modules) stays clean.
API users: axes are addressed by index, which depends on registration order; prefer one request per value.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from lib_colorize.errors import InvalidInput
from lib_colorize.options import FIELD_BY_NAME, LEVEL_NAMES, SKETCH_LEVEL_FIELDS, check_number

from .args import LEVEL_LABELS, SCALE_RANGE, level_override_attr, override_attr

__all__ = ["AXIS_PREFIX", "NUMERIC_AXES", "LEVEL_AXES", "BOOLEAN_AXES", "XL_NUMERIC_AXES", "register_xyz_axes",
           "find_xyz_module",
           "axis_labels"]

log = logging.getLogger(__name__)

AXIS_PREFIX = "[ColorizeDiffusion] "
XYZ_MODULE_NAME = "xyz_grid.py"

#: Scalar options with a numeric axis, in the order they appear in the axis dropdown.
NUMERIC_AXES = ("reference_guidance", "sketch_guidance", "sketch_strength", "reference_strength", "pad_reference",
                "guidance_start", "guidance_end", "injection_reference_fidelity", "injection_sketch_fidelity",
                "injection_start",
                # enhance modes
                "foreground_strength", "background_strength", "merging_scale", "background_factor",
                "reference_mask_threshold", "sketch_mask_threshold")
LEVEL_AXES = LEVEL_NAMES
BOOLEAN_AXES = ("injection", "style_enhance", "bg_enhance", "fg_enhance")
#: The XL models' per-level sketch strengths (after the others, so the earlier axes keep their indices).
XL_NUMERIC_AXES = SKETCH_LEVEL_FIELDS
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def axis_labels() -> list[str]:
    """Labels of every axis :func:`register_xyz_axes` adds, in order."""
    labels = [AXIS_PREFIX + FIELD_BY_NAME[name].label for name in NUMERIC_AXES]
    labels += [AXIS_PREFIX + LEVEL_LABELS[level][0] for level in LEVEL_AXES]
    labels += [AXIS_PREFIX + FIELD_BY_NAME[name].label for name in BOOLEAN_AXES]
    labels += [AXIS_PREFIX + FIELD_BY_NAME[name].label for name in XL_NUMERIC_AXES]
    return labels


def find_xyz_module() -> Optional[Any]:
    """The loaded X/Y/Z plot script module, or ``None`` (not loaded, or no webui)."""
    try:
        from modules import scripts
    except ImportError:
        return None
    for data in getattr(scripts, "scripts_data", None) or ():
        script_class = getattr(data, "script_class", None)
        if script_class is not None and script_class.__module__ == XYZ_MODULE_NAME:
            return data.module
    return None


def _setter(attr: str) -> Callable:
    def apply(p, value, values):
        setattr(p, attr, value)

    return apply


def _range_check(key: str, minimum: float, maximum: float) -> Callable:
    def confirm(p, values):
        for value in values:
            check_number(key, value, minimum, maximum)

    return confirm


def _parse_bool(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidInput(key, f"expected True or False, got {value!r}")


def _bool_setter(key: str, attr: str) -> Callable:
    def apply(p, value, values):
        setattr(p, attr, _parse_bool(key, value))

    return apply


def _bool_check(key: str) -> Callable:
    def confirm(p, values):
        for value in values:
            _parse_bool(key, value)

    return confirm


def _build_axes(module) -> list:
    axis = module.AxisOption
    axes = []
    def numeric(name: str) -> None:
        spec = FIELD_BY_NAME[name]
        axes.append(axis(AXIS_PREFIX + spec.label, float, _setter(override_attr(name)),
                         confirm=_range_check(name, spec.minimum, spec.maximum)))

    for name in NUMERIC_AXES:
        numeric(name)
    for level in LEVEL_AXES:
        axes.append(axis(AXIS_PREFIX + LEVEL_LABELS[level][0], float, _setter(level_override_attr(level)),
                         confirm=_range_check(f"level_scales.{level}", SCALE_RANGE[0], SCALE_RANGE[1])))
    for name in BOOLEAN_AXES:
        axes.append(axis(AXIS_PREFIX + FIELD_BY_NAME[name].label, str, _bool_setter(name, override_attr(name)),
                         confirm=_bool_check(name), choices=lambda: ["False", "True"]))
    for name in XL_NUMERIC_AXES:
        numeric(name)
    return axes


def register_xyz_axes(module: Optional[Any] = None) -> int:
    """Add the ColorizeDiffusion axes to the X/Y/Z module (found in ``scripts.scripts_data`` unless given).

    Returns the number of axes added: 0 when X/Y/Z is absent or the axes are already there.
    """
    if module is None:
        module = find_xyz_module()
    options = getattr(module, "axis_options", None) if module is not None else None
    if options is None or not hasattr(module, "AxisOption"):
        return 0
    present = {getattr(option, "label", None) for option in options}
    added = [axis for axis in _build_axes(module) if axis.label not in present]
    options.extend(added)
    if added:
        log.debug("ColorizeDiffusion: added %d X/Y/Z axes", len(added))
    return len(added)
