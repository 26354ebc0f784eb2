"""Infotext: the "CD ..." generation parameters <-> :class:`~lib_colorize.options.ColorizeOptions`.

The webui writes ``p.extra_generation_params`` into every image's ``parameters`` text
(``<prompt>\\nNegative prompt: ...\\nSteps: 20, Sampler: ..., CD reference guidance: 5.0, ...``) and reads it
back through "PNG info" / the paste button; the command line writes the same text into its PNG chunks and
reads it with ``--from-infotext``. This module is free of the webui: it only knows the text format.

Keys are ``"CD <name>"`` with only letters, digits, spaces, ``-`` and ``/`` (the webui's key grammar has no
dots or brackets). Which keys are written (:func:`options_to_infotext`), when colorization is enabled:

==============================  ===================================================================
key                              value
==============================  ===================================================================
CD enabled                       ``True``
CD sketch mode                   always; ``CD line extractor`` only with sketch mode ``extract``
CD reference guidance, CD sketch guidance, CD sketch strength, CD reference strength, CD pad reference,
CD guidance start, CD guidance end, CD no guidance start, CD no guidance end    always (numbers)
CD level scales                  ``E/M/L`` (encoder / middle / low), always
CD layer scales                  the 16 per-layer scales, comma separated (hence quoted), only when set
CD injection                     always; its fidelities and ``CD injection start`` only when ``True``
CD crop result                   always
CD manipulations                 JSON list of the groups, only when they take effect (some scale > 0)
CD style enhance, CD BG enhance, CD FG enhance, CD remove foreground, CD remove background   when on
CD foreground strength, CD background strength, CD sketch mask threshold   with BG or FG enhance
CD merging scale                 with BG, FG or style enhance; ``CD background factor`` with BG enhance
CD reference mask threshold, CD reference mask extractor   when a reference mask is used (BG enhance, remove ...)
CD sketch hash, CD reference hash  first 10 hex digits of the SHA-256 of the decoded RGB pixels; also
CD background hash, CD sketch mask hash, CD reference mask hash, for the images given
CD sketch strength 1..4, CD sketch rope   XL models only (:func:`options_to_infotext` with ``version``)
==============================  ===================================================================

Options the model version does not use (:data:`lib_colorize.options.VERSION_ONLY`) are not written; without a
version the SD2.1 models' keys are written, and an XL-only option only when it is not at its default.

Options that do not change the image (``return_sketch``, ``return_heatmap``) and images are not written.
:func:`infotext_to_values` is the inverse; keys that are absent take their defaults, so options that had no
effect (an injection fidelity with injection off) come back as defaults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping, Optional

from .errors import InvalidInput
from .options import (FIELD_BY_NAME, FIELDS, LEVEL_NAMES, ColorizeOptions, FieldSpec, LevelScales, applies_to,
                      coerce_scalar, parse_layer_scales, parse_level_scales, parse_manipulations)

__all__ = [
    "KEY_ENABLED", "KEY_LEVEL_SCALES", "KEY_LAYER_SCALES", "KEY_MANIPULATIONS", "KEY_SKETCH_HASH",
    "KEY_REFERENCE_HASH", "KEY_BACKGROUND_HASH", "KEY_SKETCH_MASK_HASH", "KEY_REFERENCE_MASK_HASH",
    "IMAGE_HASH_KEYS", "INFOTEXT_KEYS", "XL_INFOTEXT_KEYS", "ALL_INFOTEXT_KEYS", "FIELD_BY_INFOTEXT",
    "CONDITIONAL_FIELDS", "options_to_infotext",
    "infotext_to_values", "has_colorize_params", "image_hash", "format_number", "format_parameters_text",
    "parse_parameters_text", "quote", "unquote",
]

KEY_ENABLED = "CD enabled"
KEY_LEVEL_SCALES = "CD level scales"
KEY_LAYER_SCALES = "CD layer scales"
KEY_MANIPULATIONS = "CD manipulations"
KEY_SKETCH_HASH = "CD sketch hash"
KEY_REFERENCE_HASH = "CD reference hash"
KEY_BACKGROUND_HASH = "CD background hash"
KEY_SKETCH_MASK_HASH = "CD sketch mask hash"
KEY_REFERENCE_MASK_HASH = "CD reference mask hash"
#: image option -> its hash key
IMAGE_HASH_KEYS = {"sketch": KEY_SKETCH_HASH, "reference": KEY_REFERENCE_HASH, "background": KEY_BACKGROUND_HASH,
                   "sketch_mask": KEY_SKETCH_MASK_HASH, "reference_mask": KEY_REFERENCE_MASK_HASH}

#: Scalar options by infotext key (only options that have one in :data:`~lib_colorize.options.FIELDS`).
FIELD_BY_INFOTEXT: dict[str, FieldSpec] = {spec.infotext: spec for spec in FIELDS if spec.infotext}

#: Every key :func:`options_to_infotext` may write for the SD2.1 models.
INFOTEXT_KEYS: tuple[str, ...] = ((KEY_ENABLED,) + tuple(k for k, spec in FIELD_BY_INFOTEXT.items()
                                                         if applies_to(spec.name, "v1"))
                                  + (KEY_LEVEL_SCALES, KEY_LAYER_SCALES, KEY_MANIPULATIONS)
                                  + tuple(IMAGE_HASH_KEYS.values()))
#: The keys only the XL models' infotext has.
XL_INFOTEXT_KEYS: tuple[str, ...] = tuple(k for k in FIELD_BY_INFOTEXT if k not in INFOTEXT_KEYS)
#: Every key of any model's infotext (the webui adapter pops these when disabled).
ALL_INFOTEXT_KEYS: tuple[str, ...] = INFOTEXT_KEYS + XL_INFOTEXT_KEYS

#: Options written only when another option makes them effective: name -> predicate on the options.
def _uses_reference_mask(o) -> bool:
    return o.bg_enhance or o.remove_background or o.remove_foreground


CONDITIONAL_FIELDS = {
    "line_extractor": lambda o: o.sketch_mode == "extract",
    "injection_reference_fidelity": lambda o: o.injection,
    "injection_sketch_fidelity": lambda o: o.injection,
    "injection_start": lambda o: o.injection,
    # enhance modes (method-enhance §1): a mode's key when it is on, its controls when they act
    "style_enhance": lambda o: o.style_enhance,
    "bg_enhance": lambda o: o.bg_enhance,
    "fg_enhance": lambda o: o.fg_enhance,
    "foreground_strength": lambda o: o.mask_guided,
    "background_strength": lambda o: o.mask_guided,
    "merging_scale": lambda o: o.mask_guided or o.style_enhance,
    "background_factor": lambda o: o.bg_enhance,
    "sketch_mask_threshold": lambda o: o.mask_guided,
    "reference_mask_threshold": _uses_reference_mask,
    "reference_mask_extractor": _uses_reference_mask,
    "remove_foreground": lambda o: o.remove_foreground,
    "remove_background": lambda o: o.remove_background,
}

# The webui's key grammar: a word character, then word characters, spaces, '-' or '/'.
_KEY_RE = re.compile(r"\w[\w \-/]+\Z")
# One "key: value" pair of the parameters line; a value is a JSON string literal or runs to the next comma.
_PAIR_RE = re.compile(r'\s*(?P<key>\w[\w \-/]+):\s*(?P<value>"(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"


# ------------------------------------------------------------------------------------------- helpers
def format_number(value: float) -> str:
    """Shortest text that reads back as the same float; whole numbers without ``.0`` (``1``, ``0.35``)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def image_hash(image: Any) -> Optional[str]:
    """First 10 hex digits of SHA-256 over the image's RGB pixels and size (None for no image).

    Hashing decoded pixels (not file bytes) gives the same value in the webui, the API and the command line,
    whatever container the image arrived in.
    """
    if image is None:
        return None
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:10]


def quote(value: Any) -> Any:
    """JSON-quote a value whose text holds ``,``, ``:`` or a line break (the webui's infotext quoting)."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(text: str) -> str:
    """Inverse of :func:`quote` for a value read from the parameters line."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def _manipulations_json(groups) -> str:
    data = [dict(dataclasses.asdict(g), thresholds=list(g.thresholds)) for g in groups]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------- options -> infotext
def options_to_infotext(options: ColorizeOptions, version: Optional[str] = None) -> dict[str, Any]:
    """The ``"CD ..."`` parameters of a colorization (empty when it is disabled); see the module table.

    ``version``: the model's (``v1`` ... ``xlv2``); options it does not use are left out (default: SD2.1).
    Values are ``bool``, ``float`` or ``str``; the webui (and :func:`format_parameters_text`) quote them.
    """
    if not options.enabled:
        return {}
    out: dict[str, Any] = {KEY_ENABLED: True}
    for spec in FIELDS:
        if not spec.infotext:
            continue
        if not applies_to(spec.name, version or "v1") and (version is not None
                                                          or getattr(options, spec.name) == spec.default):
            continue
        condition = CONDITIONAL_FIELDS.get(spec.name)
        if condition is not None and not condition(options):
            continue
        value = getattr(options, spec.name)
        out[spec.infotext] = float(value) if spec.kind is float else value
        if spec.name == "reference_strength":
            levels = options.level_scales
            out[KEY_LEVEL_SCALES] = "/".join(format_number(getattr(levels, n)) for n in LEVEL_NAMES)
            if options.layer_scales is not None and applies_to("layer_scales", version or "v1"):
                out[KEY_LAYER_SCALES] = ",".join(format_number(v) for v in options.layer_scales)
    if options.active_manipulations and applies_to("manipulations", version or "v1"):
        out[KEY_MANIPULATIONS] = _manipulations_json(options.active_manipulations)
    for name, key in IMAGE_HASH_KEYS.items():
        digest = image_hash(getattr(options, name))
        if digest is not None:
            out[key] = digest
    return out


# ---------------------------------------------------------------------------------- infotext -> values
def has_colorize_params(params: Mapping[str, Any]) -> bool:
    """Whether a parsed infotext carries any ColorizeDiffusion key."""
    return any(isinstance(k, str) and k.startswith("CD ") and k in ALL_INFOTEXT_KEYS for k in params)


def _text(value: Any) -> Any:
    return unquote(value.strip()) if isinstance(value, str) else value


def _parse_level_scales(value: Any) -> LevelScales:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("/")]
        if len(parts) != len(LEVEL_NAMES):
            raise InvalidInput("level_scales", f"expected {len(LEVEL_NAMES)} numbers E/M/L, got {value!r}")
        value = parts
    return parse_level_scales(value)


def _parse_manipulations(value: Any) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise InvalidInput("manipulations", f"is not valid JSON ({error})") from None
    groups = parse_manipulations(value)
    return [dict(dataclasses.asdict(g), thresholds=list(g.thresholds)) for g in groups]


def infotext_to_values(params: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """API-key values of the ``"CD ..."`` keys of a parsed infotext (:func:`parse_parameters_text` or the
    webui's ``parse_generation_parameters``); other keys are ignored.

    The result always holds ``enabled``, every scalar option that has an infotext key, ``level_scales``,
    ``layer_scales`` and ``manipulations``; absent keys give their defaults, and an infotext without any CD key
    gives ``enabled: False``. ``ColorizeOptions.from_dict(values, require_sketch=False)`` rebuilds the options
    (images are never in an infotext). A malformed value raises :class:`~lib_colorize.errors.InvalidInput`
    naming the option; with ``strict=False`` it is replaced by the default instead (paste in the UI).
    """
    defaults = ColorizeOptions()
    values: dict[str, Any] = {"enabled": has_colorize_params(params)}
    for spec in FIELDS:
        if spec.infotext:
            values[spec.name] = spec.default
    values["level_scales"] = dataclasses.asdict(defaults.level_scales)
    values["layer_scales"] = None
    values["manipulations"] = []

    def read(key: str, name: str, parse) -> None:
        if key not in params or params[key] is None:
            return
        try:
            values[name] = parse(_text(params[key]))
        except InvalidInput:
            if strict:
                raise

    read(KEY_ENABLED, "enabled", lambda v: coerce_scalar(FIELD_BY_NAME["enabled"], v))
    for key, spec in FIELD_BY_INFOTEXT.items():
        read(key, spec.name, lambda v, spec=spec: coerce_scalar(spec, v))
    read(KEY_LEVEL_SCALES, "level_scales", lambda v: dataclasses.asdict(_parse_level_scales(v)))
    read(KEY_LAYER_SCALES, "layer_scales", lambda v: list(parse_layer_scales(v)))
    read(KEY_MANIPULATIONS, "manipulations", _parse_manipulations)
    return values


# ------------------------------------------------------------------------------ the "parameters" text
def format_parameters_text(prompt_line: str, params: Mapping[str, Any], *, negative_prompt: str = "") -> str:
    """The webui's ``parameters`` text: the prompt, ``Negative prompt: ...`` (when given), then one line of
    ``key: value`` pairs joined by ``", "``. ``None`` values are left out; a value equal to its key is written
    bare; values holding ``,``, ``:`` or a line break are JSON-quoted. Keys must fit the webui's key grammar.
    """
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"infotext key {key!r} may only hold letters, digits, spaces, '-' and '/'")
        pairs.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt_line or ''}{negative}\n{', '.join(pairs)}".strip()


def parse_parameters_text(text: str) -> dict[str, str]:
    """Inverse of :func:`format_parameters_text`, read like the webui's ``parse_generation_parameters``.

    Returns the ``key: value`` pairs of the last line (unquoted strings), plus ``"Prompt"`` and
    ``"Negative prompt"``. The last line counts as parameters only if it holds at least three pairs (the
    webui's rule). A ``WxH`` value (``Size``) is also split into ``"<key>-1"`` and ``"<key>-2"``.
    """
    *lines, last = (text or "").strip().split("\n")
    if len(_PAIR_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result: dict[str, str] = {}
    for match in _PAIR_RE.finditer(last):
        key, value = match.group("key"), match.group("value")
        if not key:
            continue
        value = unquote(value)
        result[key] = value
        size = _SIZE_RE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    return result
