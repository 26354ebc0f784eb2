"""The command line's flags, and how they become options: every accordion option is a flag named like its API key."""
from __future__ import annotations

import argparse
from typing import Optional

from ..errors import InvalidInput
from ..options import FIELDS, LEVEL_NAMES, NUM_ATTENTION_LAYERS
from ..weights import ENV_MODELS_DIR, ModelsRoot

# Released checkpoint names, for the help text (the catalog is :data:`lib_colorize.weights.RELEASED_CHECKPOINTS`).
_RELEASED = "mult-eps-newft, mult-eps-ft, mult-ft, mult-newft, switch-eps, v2-full"


def build_parser(root: ModelsRoot) -> argparse.ArgumentParser:
    """The parser; ``root`` is the models folder the run would use without ``--models-dir`` (shown in --help)."""
    from ..samplers import SAMPLERS, SCHEDULES

    parser = argparse.ArgumentParser(
        prog="python -m lib_colorize",
        description="Colorize line art after a reference image with ColorizeDiffusion.",
        epilog="Exit codes: 0 all pages done; 1 some pages failed (listed at the end); 2 nothing could run "
               "(bad option, missing weights, unusable checkpoint or output).")
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", help="ColorizeDiffusion checkpoint file, or the name of a released one "
                                         f"({_RELEASED}) to take from, or download into, the models folder")
    io.add_argument("--reference", help="colour reference image")
    io.add_argument("--sketch", help="sketch image, or a folder of sketches (one output per page; the folder is "
                                     "not searched recursively)")
    io.add_argument("--out", help="output PNG, or a folder (a folder run, or a name ending in / for one sketch): "
                                  "each page gives <stem>.png there, <name>.png (a.jpg -> a.jpg.png) when pages "
                                  "share a stem")
    io.add_argument("--background", help="background image for BG / style enhance (instead of the reference's own)")
    io.add_argument("--sketch-mask", help="character mask of the sketch (white = character) instead of ISNet-sketch; "
                                          "with a folder of sketches it applies to every page")
    io.add_argument("--reference-mask", help="character mask of the reference (white = character) instead of the "
                                             "reference mask extractor")
    io.add_argument("--from-infotext", metavar="PNG", help="take options, sampler, steps, seed and size from a "
                                                            "result's parameters; other flags override them")
    io.add_argument("--visualize", action="store_true", help="write the manipulation heat map of the reference "
                                                             "to --out instead of colorizing")
    io.add_argument("--resume", action="store_true", help="folder run: skip pages whose outputs exist")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input file)")
    io.add_argument("--models-dir", default=None,
                    help="models folder, with Stable-diffusion/ (checkpoints) and ColorizeDiffusion/ (OpenCLIP, "
                         f"line extractors). Without it: ${ENV_MODELS_DIR}, else the webui's models folder when "
                         "this runs from a webui's extensions folder, else the Hugging Face cache. "
                         f"Now: {root.describe()}")
    io.add_argument("--offline", action="store_true", help="never download weights (HF_HUB_OFFLINE=1 does the same)")
    io.add_argument("--verbose", action="store_true", help="also list the files of a folder that are skipped "
                                                           "(not images)")

    opts = parser.add_argument_group("colorization options (same names as the API keys)")
    for spec in FIELDS:
        if spec.name == "enabled":
            continue
        kwargs = {"dest": spec.name, "default": None, "help": spec.tooltip}
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind is float:
            kwargs.update(type=float, metavar="X", help=f"{spec.tooltip} [{spec.minimum:g}..{spec.maximum:g}, "
                                                          f"default {spec.default:g}]")
        else:
            kwargs.update(choices=spec.choices, help=f"{spec.tooltip} (default {spec.default})")
        opts.add_argument(spec.cli_flag, **kwargs)
    opts.add_argument("--level-scales", nargs=3, type=float, metavar=("ENCODER", "MIDDLE", "LOW"), default=None,
                      help="cross-attention scales by level, each in [0, 1]")
    opts.add_argument("--layer-scales", nargs=NUM_ATTENTION_LAYERS, type=float, metavar="S", default=None,
                      help="16 per-layer cross-attention scales (overrides --level-scales)")
    opts.add_argument("--manipulation", action="append", default=None, metavar="LINE",
                      help="a manipulation group, as a line of the UI's sequence: '[target] T; [anchor] A; "
                           "[control] C; [scale] 5; [enhanced] False; [ts0] 0.5; [ts1] 0.55; [ts2] 0.65; "
                           "[ts3] 0.95' (repeatable, applied in order)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--sampler", default=None, help=f"the webui's sampler name: one of {', '.join(SAMPLERS)} "
                                                          "(default DPM++ 2M)")
    sampling.add_argument("--schedule", default=None, help=f"the webui's schedule type: one of {', '.join(SCHEDULES)} "
                                                           "(default Automatic: the sampler's own, as in the webui)")
    sampling.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    sampling.add_argument("--seed", type=int, default=None, help="seed; -1 random (default)")
    sampling.add_argument("--width", type=int, default=None, help="multiple of 64 (XL: 32); given alone, the "
                                                                   "height keeps the sketch's aspect ratio (default: "
                                                                   "the aspect ratio at the model's native size; "
                                                                   "XL: --autofit)")
    sampling.add_argument("--height", type=int, default=None, help="multiple of 64 (XL: 32); given alone, the width "
                                                                    "keeps the sketch's aspect ratio")
    sampling.add_argument("--autofit", action=argparse.BooleanOptionalAction, default=None,
                          help="XL models: size from the sketch by the XL app's rule (about 1024², multiples of "
                               "32, each side in 768..1536); on by default for XL, --no-autofit gives 1024x1024")
    sampling.add_argument("--batch-size", type=int, default=None,
                          help="images per sketch (default 1); with N > 1 the outputs are <name>-0.png .. "
                               "<name>-(N-1).png, with seeds seed .. seed+N-1")
    sampling.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    sampling.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                          help="U-Net precision (default float16 on GPU, float32 on CPU)")
    sampling.add_argument("--clip-arch", default="ViT-H-14",
                          help="open_clip architecture name, or an open_clip model-config .json file (default "
                               "ViT-H-14, what the released checkpoints use)")
    sampling.add_argument("--clip-weights", default=None,
                          help="OpenCLIP weights file (default: from the models folder's ColorizeDiffusion/: "
                               "open_clip_pytorch_model.safetensors or .bin for ViT-H-14, open_clip_<arch>.* "
                               "for another architecture)")
    return parser


def options_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> dict:
    """API-key dict: infotext values (``base``) overridden by the flags given."""
    from ..manipulation import parse_manipulation_sequence

    values = dict(base or {})
    values["enabled"] = True
    for spec in FIELDS:
        if spec.name != "enabled" and getattr(args, spec.name, None) is not None:
            values[spec.name] = getattr(args, spec.name)
    if args.level_scales is not None:
        values["level_scales"] = dict(zip(LEVEL_NAMES, args.level_scales))
    if args.layer_scales is not None:
        values["layer_scales"] = list(args.layer_scales)
    if args.manipulation is not None:
        groups = parse_manipulation_sequence("\n".join(args.manipulation))
        values["manipulations"] = [dict(target=g.target, anchor=g.anchor, control=g.control, scale=g.scale,
                                        enhance=g.enhance, thresholds=list(g.thresholds)) for g in groups]
    return values


def sampling_from_args(args: argparse.Namespace, base: Optional[dict] = None):
    from ..pipeline import SamplingOptions

    base = base or {}
    sampling = SamplingOptions(**{k: v for k, v in base.items() if k in SamplingOptions.__dataclass_fields__})
    for name in ("sampler", "schedule", "steps", "seed", "width", "height", "batch_size", "autofit"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    return sampling


def read_infotext(path: str) -> tuple[dict, dict, dict]:
    """(option values, sampling values, the raw parameters) of a PNG's ``parameters`` text."""
    from PIL import Image

    from ..infotext import infotext_to_values, parse_parameters_text

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except OSError as error:
        raise InvalidInput("from_infotext", f"cannot read {path}: {error}") from None
    if not text:
        raise InvalidInput("from_infotext", f"{path} has no 'parameters' text (not a colorization result?)")
    params = parse_parameters_text(text)
    sampling: dict = {}
    if "Sampler" in params:
        sampling["sampler"] = params["Sampler"]
    if "Schedule type" in params:
        sampling["schedule"] = params["Schedule type"]
    for key, name in (("Steps", "steps"), ("Seed", "seed")):
        if key in params:
            sampling[name] = int(params[key])
    if "Size" in params:
        width, _, height = params["Size"].partition("x")
        sampling["width"], sampling["height"] = int(width), int(height)
    return infotext_to_values(params), sampling, params
