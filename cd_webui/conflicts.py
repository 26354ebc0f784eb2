"""Other webui features that change or break what ColorizeDiffusion does, detected for each sampling pass.

==============================  ========================================================  ==========================
feature (detected by)           what it does to a colorization                            outcome
==============================  ========================================================  ==========================
Hypertile U-Net (its layer      splits self-attention into tiles (batch x tiles) but      with attention injection:
parameters on the attn1         passes the context through: the injected context          refused; without: works
modules, ``enabled``)           ``[own ; bank]`` has the wrong batch                      (tiles are its own trade)
token merging (the ratio the    self-attention sees merged tokens, so the injection       with attention injection:
webui applied to the model)     bank holds merged reference tokens                        notice (UI) / error (API)
ControlNet reference-only /     a second reference injection into the same U-Net, which   refused
AdaIN (an enabled unit of the   also runs inside ColorizeDiffusion's own U-Net calls
ControlNet script)
Self Attention Guidance (its    an extra U-Net pass that assumes the ``[cond | uncond]``  refused
script enabled)                 row layout; ColorizeDiffusion's rows are
                                ``[c | u_ref | u_sketch]``
dynamic thresholding or any     replaces the CFG combination, which the dual guidance     notice (UI) / error (API):
other ``combine_denoised``      replaces in turn: it would not be applied                 it is not applied
override (the sampler's
denoiser class)
==============================  ========================================================  ==========================

"Refused" conflicts are errors everywhere (the UI shows them in place of the image). The others are a notice under
the image in the UI (``p.comment``, also printed) and an error through the API, which has no place for notices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from lib_colorize.errors import InvalidInput
from lib_colorize.options import ColorizeOptions
from lib_colorize.processors import transformer_blocks

HYPERTILE_PARAMS = "__webui_hypertile_params"
CONTROLNET_REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")


@dataclass(frozen=True)
class Conflict:
    """One feature in the way: ``field`` names it in the error, ``refused`` makes it an error in the UI too."""

    field: str
    message: str
    refused: bool


def _alwayson_args(p) -> Iterator[tuple[str, tuple]]:
    runner = getattr(p, "scripts", None)
    args = tuple(getattr(p, "script_args", None) or ())
    for script in getattr(runner, "alwayson_scripts", None) or ():
        try:
            title = str(script.title())
        except Exception:  # noqa: BLE001 - someone else's script
            continue
        start, end = getattr(script, "args_from", None), getattr(script, "args_to", None)
        if start is not None and end is not None:
            yield title.lower(), args[start:end]


def _unit_value(unit: Any, key: str, default: Any) -> Any:
    return unit.get(key, default) if isinstance(unit, Mapping) else getattr(unit, key, default)


def controlnet_reference_units(p) -> list[str]:
    """The preprocessor names of the enabled reference-only/AdaIN units of the ControlNet script, if any."""
    found = []
    for title, args in _alwayson_args(p):
        if title != "controlnet":
            continue
        for unit in args:
            if isinstance(unit, Mapping) or hasattr(unit, "module"):
                module = str(_unit_value(unit, "module", "") or "")
                if _unit_value(unit, "enabled", True) is True and module in CONTROLNET_REFERENCE_MODULES:
                    found.append(module)
    return found


def self_attention_guidance_enabled(p) -> bool:
    return any(title == "self attention guidance" and args and args[0] is True for title, args in _alwayson_args(p))


def hypertile_active(unet) -> bool:
    """Whether Hypertile tiles any self-attention of this U-Net now (it configures its layers per pass)."""
    return any(getattr(getattr(block.attn1, HYPERTILE_PARAMS, None), "enabled", False)
               for block in transformer_blocks(unet))


def cfg_combination_override(denoiser) -> str:
    """The denoiser class's name when it overrides the webui's ``combine_denoised`` (empty otherwise)."""
    try:
        from modules.sd_samplers_cfg_denoiser import CFGDenoiser
    except ImportError:  # pragma: no cover - every webui v1.6+ has it
        return ""
    base = getattr(CFGDenoiser, "combine_denoised", None)
    own = getattr(type(denoiser), "combine_denoised", None)
    return type(denoiser).__name__ if own is not None and own is not base else ""


HYPERTILE = ("Hypertile U-Net cannot be combined with attention injection (it tiles self-attention, which "
             "injection extends with the reference's tokens); turn off Hypertile U-Net in the settings or attention "
             "injection")
TOKEN_MERGING = ("token merging (ratio {ratio:g}) merges the tokens attention injection attends to, so injection is "
                 "weaker and different; set the token merging ratio to 0 for attention injection")
CONTROLNET = ("ControlNet {units} injects a second reference into the same U-Net; turn that ControlNet unit off "
              "(ColorizeDiffusion's attention injection does the same job)")
SELF_ATTENTION_GUIDANCE = ("Self Attention Guidance expects the webui's [cond | uncond] rows, which "
                           "ColorizeDiffusion's dual guidance replaces; turn Self Attention Guidance off")
CFG_COMBINATION = ("the sampler's {override} changes the CFG combination (dynamic thresholding or similar), which "
                   "ColorizeDiffusion's dual guidance replaces: it is not applied; turn it off")


def detect(p, unet, denoiser, options: ColorizeOptions) -> list[Conflict]:
    """The conflicts of this sampling pass."""
    injection = bool(options.injection)
    ratio = float(getattr(getattr(p, "sd_model", None), "applied_token_merged_ratio", 0) or 0)
    units = ", ".join(sorted(set(controlnet_reference_units(p))))
    override = cfg_combination_override(denoiser)
    checks = (  # (field, present, refused, message)
        ("hypertile", injection and hypertile_active(unet), True, HYPERTILE),
        ("token_merging", injection and ratio > 0, False, TOKEN_MERGING.format(ratio=ratio)),
        ("controlnet", bool(units), True, CONTROLNET.format(units=units)),
        ("self_attention_guidance", self_attention_guidance_enabled(p), True, SELF_ATTENTION_GUIDANCE),
        ("cfg_combination", bool(override), False, CFG_COMBINATION.format(override=override)),
    )
    return [Conflict(field, message, refused) for field, present, refused, message in checks if present]


def report(p, conflicts: Iterable[Conflict]) -> None:
    """Raise the first conflict that is refused here (all of them through the API); the others become notices."""
    conflicts = list(conflicts)
    api = bool(getattr(p, "is_api", False))
    for conflict in conflicts:
        if conflict.refused or api:
            raise InvalidInput(conflict.field, conflict.message)
    for conflict in conflicts:
        notice(p, f"ColorizeDiffusion: {conflict.message}.")


def notice(p, text: str) -> None:
    """A note under the image in the UI (the webui's ``p.comment``), and in the console."""
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(text)
    print(text)
