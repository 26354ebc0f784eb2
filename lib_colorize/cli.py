"""``python -m lib_colorize``: colorize a sketch, or every page of a folder, after one reference.

Every accordion option is a flag named like its API key (``--reference-guidance``, ``--sketch-mode``, ...).
Outputs are PNGs whose ``parameters`` text is the webui's infotext, so a result pasted into the webui's PNG
info restores the accordion, and ``--from-infotext result.png`` reproduces it here.

Exit codes: 0 all pages done; 1 some pages failed (listed at the end); 2 nothing could run (bad option,
missing weights, unusable checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .errors import ColorizeError, InvalidInput
from .options import FIELDS, LEVEL_NAMES, NUM_ATTENTION_LAYERS, ColorizeOptions, check_prompt_tokens

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS, SCHEDULES

    parser = argparse.ArgumentParser(
        prog="python -m lib_colorize",
        description="Colorize line art after a reference image with ColorizeDiffusion.")
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", help="ColorizeDiffusion .safetensors file, or the name of a released one "
                                         "(mult-eps-ft, mult-eps-newft, switch-eps, v2-full, ...) to take from "
                                         "or download into --models-dir/Stable-diffusion")
    io.add_argument("--reference", help="colour reference image")
    io.add_argument("--sketch", help="sketch image, or a folder of sketches (one output per page)")
    io.add_argument("--out", help="output PNG (single sketch) or folder (folder of sketches)")
    io.add_argument("--background", help="background image for BG / style enhance (instead of the reference's own)")
    io.add_argument("--sketch-mask", help="character mask of the sketch (white = character) instead of ISNet-sketch; "
                                          "with a folder of sketches it applies to every page")
    io.add_argument("--reference-mask", help="character mask of the reference (white = character) instead of the "
                                             "reference mask extractor")
    io.add_argument("--from-infotext", metavar="PNG", help="take options, sampler, steps, seed and size from a "
                                                            "result's parameters; other flags override them")
    io.add_argument("--visualize", action="store_true", help="write the manipulation heat map of the reference "
                                                             "to --out instead of colorizing")
    io.add_argument("--resume", action="store_true", help="folder run: skip pages whose output exists")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    io.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR),
                    help="folder with Stable-diffusion/ and ColorizeDiffusion/ (OpenCLIP, line extractors)")
    io.add_argument("--offline", action="store_true", help="never download weights")

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
    sampling.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default DPM++ 2M)")
    sampling.add_argument("--schedule", default=None, help=f"one of {', '.join(SCHEDULES)}")
    sampling.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    sampling.add_argument("--seed", type=int, default=None, help="seed; -1 random (default)")
    sampling.add_argument("--width", type=int, default=None, help="multiple of 64 (XL: 32); default keeps the "
                                                                   "sketch's aspect ratio at the model's native "
                                                                   "size (XL: --autofit)")
    sampling.add_argument("--height", type=int, default=None, help="multiple of 64 (XL: 32)")
    sampling.add_argument("--autofit", action=argparse.BooleanOptionalAction, default=None,
                          help="XL models: size from the sketch by the XL app's rule (about 1024², multiples of "
                               "32, each side in 768..1536); on by default for XL, --no-autofit gives 1024x1024")
    sampling.add_argument("--batch-size", type=int, default=None, help="images per sketch (default 1)")
    sampling.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    sampling.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                          help="U-Net precision (default float16 on GPU, float32 on CPU)")
    sampling.add_argument("--clip-arch", default="ViT-H-14",
                          help="open_clip architecture name, or an open_clip model-config .json file (default ViT-H-14)")
    sampling.add_argument("--clip-weights", default=None, help="OpenCLIP weights file (default: "
                                                                "<models-dir>/ColorizeDiffusion/open_clip_pytorch_model.bin)")
    return parser


# ---------------------------------------------------------------------------------------------- options
def options_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> dict:
    """API-key dict: infotext values (``base``) overridden by the flags given."""
    from .manipulation import parse_manipulation_sequence

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
    from .pipeline import SamplingOptions

    base = base or {}
    sampling = SamplingOptions(**{k: v for k, v in base.items() if k in SamplingOptions.__dataclass_fields__})
    for name in ("sampler", "schedule", "steps", "seed", "width", "height", "batch_size", "autofit"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    return sampling


def read_infotext(path: str) -> tuple[dict, dict]:
    """(option values, sampling values) from a PNG's ``parameters`` text."""
    from PIL import Image

    from .infotext import infotext_to_values, parse_parameters_text

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
    return infotext_to_values(params), sampling


def parameters_text(options: ColorizeOptions, sampling, seed: int, width: int, height: int,
                    checkpoint_name: str, version: Optional[str] = None) -> str:
    from .infotext import format_parameters_text, options_to_infotext

    params = {"Steps": sampling.steps, "Sampler": sampling.sampler, "Schedule type": sampling.schedule,
              "Seed": seed, "Size": f"{width}x{height}", "Model": checkpoint_name}
    params.update(options_to_infotext(options, version))
    return format_parameters_text("", params)


def save_png_atomic(image, path: Path, parameters: Optional[str] = None) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written PNG."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- pages
def list_pages(sketch: Path) -> list[Path]:
    if sketch.is_dir():
        return sorted(p for p in sketch.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [sketch]


def output_paths(page: Path, out: Path, folder_run: bool, batch_size: int) -> list[Path]:
    target = out / f"{page.stem}.png" if folder_run else out
    if batch_size == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i}{target.suffix or '.png'}") for i in range(batch_size)]


def clip_architecture(arch: str) -> str:
    """An open_clip architecture name; a model-config JSON file is registered with open_clip first."""
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise InvalidInput("clip_arch", f"{arch} does not exist")
        import open_clip

        open_clip.add_model_config(arch)
        return Path(arch).stem
    return arch


def resolve_device_dtype(device: Optional[str], dtype: Optional[str]):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "float32" if device == "cpu" else "float16"
    if device == "cpu" and dtype != "float32":
        raise InvalidInput("dtype", "half precision needs a GPU; use --dtype float32 on the CPU")
    return device, getattr(torch, dtype)


def run(args: argparse.Namespace, out=None, err=None) -> int:
    from .images import load_image_file
    from .weights import resolve_checkpoint

    out, err = out or sys.stdout, err or sys.stderr

    base_options, base_sampling = ({}, {})
    if args.from_infotext:
        base_options, base_sampling = read_infotext(args.from_infotext)
    for flag in ("checkpoint", "reference", "out"):
        if not getattr(args, flag):
            raise InvalidInput(flag, f"--{flag} is required")
    if not args.visualize and not args.sketch:
        raise InvalidInput("sketch", "--sketch is required (a file or a folder)")
    values = options_from_args(args, base_options)
    values["reference"] = load_image_file(args.reference, "reference")
    for name in ("background", "sketch_mask", "reference_mask"):
        if getattr(args, name, None):
            values[name] = load_image_file(getattr(args, name), name)
    probe = ColorizeOptions.from_dict(values, require_sketch=False)   # validate everything before loading models
    if probe.manipulations:
        from .models.clip import count_tokens

        check_prompt_tokens(probe, count_tokens)
    sampling = sampling_from_args(args, base_sampling)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    checkpoint_path = resolve_checkpoint(args.checkpoint, args.models_dir, allow_download=not args.offline)
    from .checkpoint import inspect_checkpoint
    from .enhance import check_version

    info = inspect_checkpoint(checkpoint_path)          # the key table only: what the options must fit
    probe.check_version(info.version)
    check_version(probe, info.version)                  # before any model is loaded
    sampling.check(info.family.size_multiple)

    from .pipeline import Colorizer

    colorizer = Colorizer.from_files(checkpoint_path, clip_arch=clip_architecture(args.clip_arch), clip_weights=args.clip_weights,
                                     models_dir=os.path.join(args.models_dir, "ColorizeDiffusion"),
                                     device=device, dtype=dtype, allow_download=not args.offline,
                                     encode_first=(probe,))
    if args.visualize:
        heatmap = colorizer.heatmap(probe)
        save_png_atomic(heatmap, Path(args.out))
        print(f"wrote {args.out}", file=out)
        return 0

    sketch_path, out_path = Path(args.sketch), Path(args.out)
    folder_run = sketch_path.is_dir()
    if not folder_run and not sketch_path.exists():
        raise InvalidInput("sketch", f"{sketch_path} does not exist")
    pages = list_pages(sketch_path)
    failures: list[tuple[Path, str]] = []
    done = skipped = 0
    progress = _progress(len(pages), "pages", err)
    for page in pages:
        targets = output_paths(page, out_path, folder_run, sampling.batch_size)
        existing = [t for t in targets if t.exists()]
        if existing and args.resume and len(existing) == len(targets):
            skipped += 1
            progress.update(1)
            continue
        if existing and not args.overwrite:
            failures.append((page, f"{existing[0]} exists; pass --overwrite to replace it or --resume to skip"))
            progress.update(1)
            continue
        try:
            options = probe.replace(sketch=load_image_file(page, "sketch"))
            steps = _progress(sampling.steps, page.name, err, leave=False)
            result = colorizer.colorize(options, sampling, callback=lambda *a: steps.update(1))
            steps.close()
            for i, (image, target) in enumerate(zip(result.images, targets)):
                text = parameters_text(options, sampling, result.seed + i, result.width, result.height,
                                       Path(checkpoint_path).stem, info.version)
                save_png_atomic(image, target, text)
            if result.sketch is not None:
                save_png_atomic(result.sketch, targets[0].with_name(targets[0].stem + "-sketch.png"))
            if result.heatmap is not None:
                save_png_atomic(result.heatmap, targets[0].with_name(targets[0].stem + "-heatmap.png"))
            for i, mask in enumerate(result.masks):
                save_png_atomic(mask, targets[0].with_name(f"{targets[0].stem}-mask{i}.png"))
            done += 1
        except ColorizeError as error:
            failures.append((page, str(error)))
        progress.update(1)
    progress.close()
    print(f"{done} done, {skipped} skipped, {len(failures)} failed", file=out)
    for page, message in failures:
        print(f"FAILED {page}: {message}", file=err)
    return 1 if failures else 0


def _progress(total: int, desc: str, stream, leave: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=stream, leave=leave, disable=total <= 1 and desc == "pages")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ColorizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
