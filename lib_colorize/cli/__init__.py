"""``python -m lib_colorize``: colorize a sketch, or every page of a folder, after one reference.

Every accordion option is a flag named like its API key (``--reference-guidance``, ``--sketch-mode``, ...).
Outputs are PNGs whose ``parameters`` text is the webui's infotext, so a result pasted into the webui's PNG
info restores the accordion, and ``--from-infotext result.png`` reproduces it here.

A run checks everything that needs no model first (options, device, every input and output, the weight files and
whether they fit together), so a mistake costs seconds, not a multi-GB load. Then it loads the models, saying
what and how long, and colorizes the pages: one plain line per page, progress bars only on a terminal.

Exit codes: 0 all pages done; 1 some pages failed (listed at the end); 2 nothing could run (bad option,
missing weights, unusable checkpoint or output).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ColorizeError, InvalidInput, MissingWeights
from ..options import ColorizeOptions, check_prompt_tokens
from .arguments import build_parser, options_from_args, read_infotext, sampling_from_args
from .files import WriteFailed, save_png
from .pages import (Page, check_folder_out, check_not_an_input, check_writable, decide, list_folder, output_stems,
                    outputs_for, single_target)

__all__ = ["main", "run", "build_parser", "resolve_device_dtype", "clip_architecture"]


def clip_architecture(arch: str) -> str:
    """An open_clip architecture name; a model-config JSON file is registered with open_clip first. Unknown names
    raise :class:`InvalidInput` listing the known ones."""
    from ..models.clip import model_config

    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise InvalidInput("clip_arch", f"{arch} does not exist")
        import open_clip

        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    model_config(arch)
    return arch


def resolve_device_dtype(device: Optional[str], dtype: Optional[str]):
    """(torch.device, torch dtype) for ``--device``/``--dtype``; a device this machine lacks is refused."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInput("device", f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidInput("device", f"{device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInput("device", f"{device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InvalidInput("device", f"{device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InvalidInput("device", f"{device}: only cpu, cuda, cuda:N and mps are supported")
    if dtype is None:
        dtype = "float32" if dev.type == "cpu" else "float16"
    if dev.type == "cpu" and dtype != "float32":
        raise InvalidInput("dtype", "half precision needs a GPU; use --dtype float32 on the CPU")
    return dev, getattr(torch, dtype)


def parameters_text(options: ColorizeOptions, sampling, seed: int, width: int, height: int,
                    checkpoint_name: str, version: Optional[str] = None) -> str:
    from ..infotext import format_parameters_text, options_to_infotext

    params = {"Steps": sampling.steps, "Sampler": sampling.sampler, "Schedule type": sampling.schedule,
              "Seed": seed, "Size": f"{width}x{height}", "Model": checkpoint_name}
    params.update(options_to_infotext(options, version))
    return format_parameters_text("", params)


class Console:
    """What the user sees: status lines on stderr, a line per page on stdout, bars only when stderr is a terminal."""

    def __init__(self, out, err):
        self.out, self.err = out, err
        self.terminal = bool(getattr(err, "isatty", lambda: False)())

    def status(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    def result(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def bar(self, total: int, desc: str, leave: bool = True):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=self.err, leave=leave, disable=not self.terminal)


def _check_hashes(params: dict, reference, sketch, source: str, console: Console) -> None:
    """Warn when ``--from-infotext`` is given other images than the ones its result was made from."""
    from ..infotext import KEY_REFERENCE_HASH, KEY_SKETCH_HASH, image_hash

    for key, image, what in ((KEY_REFERENCE_HASH, reference, "reference"), (KEY_SKETCH_HASH, sketch, "sketch")):
        recorded = params.get(key)
        if image is None or not recorded:
            continue
        actual = image_hash(image)
        if actual != recorded:
            console.status(f"warning: the {what} differs from the one {source} was made from (hash {actual}, "
                           f"recorded {recorded}); the result will not reproduce it")


def _plan(args: argparse.Namespace, probe: ColorizeOptions, batch_size: int, inputs: list,
          console: Console) -> tuple[list, bool]:
    """(pages, folder_run) with every output decided and checked; nothing is loaded yet."""
    from ..images import load_image_file

    extras = [kind for kind, wanted in (("sketch", probe.return_sketch), ("heatmap", probe.return_heatmap))
              if wanted]
    if probe.return_masks:   # the sketch mask and the reference (or background) mask, when the modes used them
        extras += ["mask0", "mask1"]
    if args.visualize:
        if not probe.manipulations:
            raise InvalidInput("manipulations", "--visualize shows the regions a manipulation selects: give at least "
                                                "one --manipulation (or --from-infotext of a result that has one)")
        page = Page(Path(args.reference), [Path(args.out)])
        pages, folder_run = [page], False
    else:
        sketch = Path(args.sketch)
        folder_run = sketch.is_dir()
        if folder_run:
            found, others = list_folder(sketch)
            if args.verbose:
                for other in others:
                    console.status(f"skipped {other}: {'a folder' if other.is_dir() else 'not an image'}")
            if not found:
                raise InvalidInput("sketch", f"{sketch} holds no images (.png, .jpg, .jpeg, .webp, .bmp)"
                                             + ("" if args.verbose or not others else
                                                f"; {len(others)} other file(s) skipped, --verbose lists them"))
            out = Path(args.out)
            check_folder_out(sketch, out)
            stems = output_stems(found)
            pages = [outputs_for(page, out / f"{stems[page]}.png", batch_size, extras) for page in found]
            inputs = inputs + found
        else:
            if not sketch.exists():
                raise InvalidInput("sketch", f"{sketch} does not exist")
            load_image_file(sketch, "sketch")   # an unreadable sketch fails now, not after loading the models
            pages = [outputs_for(sketch, single_target(sketch, args.out), batch_size, extras)]
            inputs = inputs + [sketch]
    for page in pages:
        check_not_an_input(page, inputs)
    check_writable(Path(args.out) if folder_run else pages[0].images[0].parent)
    decide(pages, resume=args.resume, overwrite=args.overwrite)
    if not folder_run and pages[0].refusal:
        raise InvalidInput("out", pages[0].refusal)
    return pages, folder_run


def _weights(args, root, arch: str, probe: ColorizeOptions, sampling, console: Console):
    """(checkpoint path, OpenCLIP weights path, checkpoint info): found or downloaded, and checked to fit together
    and to the options, before loading. The line extractor's weights are fetched too when the sketch mode needs
    them. XL checkpoints take no OpenCLIP file: their reference encoders' files are found (or downloaded) by
    :meth:`lib_colorize.pipeline.Colorizer.from_xl_files` before anything is loaded."""
    from .. import weights
    from ..checkpoint import inspect_checkpoint
    from ..extractors import get_spec, weights_path
    from ..models.clip import output_width, resolve_clip_weights

    allow = not args.offline
    progress = weights.line_progress(console.status)
    checkpoint = weights.resolve_checkpoint(args.checkpoint, root, allow_download=allow, progress=progress)
    info = inspect_checkpoint(checkpoint)   # the key table only: an unusable file is refused before loading
    from ..enhance import check_version

    probe.check_version(info.version)    # options of another model family are refused before loading
    check_version(probe, info.version)   # a mode the checkpoint's version lacks is refused before loading
    sampling.check(info.family.size_multiple)
    clip_path = None
    if not info.family.is_xl:
        clip_path = resolve_clip_weights(arch, args.clip_weights, models_dir=root.folder(weights.EXTENSION_FOLDER),
                                         allow_download=allow, progress=progress)
    width = output_width(arch)
    if not info.family.is_xl and info.context_dim is not None and info.context_dim != width:
        raise InvalidInput("clip_arch", f"the checkpoint {checkpoint.name} takes reference tokens "
                                        f"{info.context_dim} wide, but OpenCLIP {arch} gives tokens {width} wide; "
                                        "pass the --clip-arch it was trained with (the released checkpoints: "
                                        "ViT-H-14, 1024 wide)")
    if not args.visualize and probe.sketch_mode == "extract" and get_spec(probe.line_extractor).needs_weights:
        weights_path(probe.line_extractor, root.folder(weights.EXTENSION_FOLDER), allow_download=allow,
                     progress=progress)
    return checkpoint, clip_path, info


def run(args: argparse.Namespace, out=None, err=None) -> int:
    from ..images import load_image_file
    from ..weights import EXTENSION_FOLDER, models_root

    console = Console(out or sys.stdout, err or sys.stderr)
    base_options, base_sampling, recorded = ({}, {}, {})
    if args.from_infotext:
        base_options, base_sampling, recorded = read_infotext(args.from_infotext)
    for flag in ("checkpoint", "reference", "out"):
        if not getattr(args, flag):
            raise InvalidInput(flag, f"--{flag.replace('_', '-')} is required")
    if not args.visualize and not args.sketch:
        raise InvalidInput("sketch", "--sketch is required (a file or a folder)")
    values = options_from_args(args, base_options)
    values["reference"] = load_image_file(args.reference, "reference")
    for name in ("background", "sketch_mask", "reference_mask"):
        if getattr(args, name, None):
            values[name] = load_image_file(getattr(args, name), name)
    probe = ColorizeOptions.from_dict(values, require_sketch=False)   # every option checked before loading
    sampling = sampling_from_args(args, base_sampling)
    sampling.check(size_multiple=32)   # the finest any model family allows; the checkpoint's own rule follows
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    inputs = [Path(args.reference)] + ([Path(args.from_infotext)] if args.from_infotext else []) + \
        [Path(getattr(args, name)) for name in ("background", "sketch_mask", "reference_mask") if getattr(args, name)]
    pages, folder_run = _plan(args, probe, sampling.batch_size, inputs, console)
    if args.from_infotext:
        single = None if folder_run or args.visualize else load_image_file(pages[0].source, "sketch")
        _check_hashes(recorded, probe.reference, single, args.from_infotext, console)
    failures = [(page.source, page.refusal) for page in pages if page.refusal]
    todo = [page for page in pages if not page.refusal and not page.skip]
    if not todo:
        return _summary(console, 0, len(pages) - len(failures), failures)

    arch = clip_architecture(args.clip_arch)
    if probe.manipulations:
        from ..models.clip import count_tokens

        check_prompt_tokens(probe, count_tokens)
    root = models_root(args.models_dir)
    checkpoint_path, clip_path, info = _weights(args, root, arch, probe, sampling, console)

    from ..pipeline import Colorizer

    colorizer = Colorizer.from_files(checkpoint_path, clip_arch=arch, clip_weights=clip_path,
                                     models_dir=root.folder(EXTENSION_FOLDER), device=device, dtype=dtype,
                                     allow_download=not args.offline, encode_first=(probe,))
    if args.visualize:
        target = pages[0].images[0]
        try:
            save_png(colorizer.heatmap(probe), target)
        except WriteFailed as error:
            raise InvalidInput("out", str(error)) from None
        console.result(f"wrote {target}")
        return 0
    return _colorize_pages(colorizer, probe, sampling, pages, todo, failures, Path(checkpoint_path).stem,
                           info.version, console)


def _colorize_pages(colorizer, probe, sampling, pages, todo, failures, checkpoint_name, version, console) -> int:
    from ..images import load_image_file

    done = 0
    skipped = sum(page.skip for page in pages)
    bar = console.bar(len(todo), "pages") if len(todo) > 1 else None
    for number, page in enumerate(todo, 1):
        started = time.monotonic()
        prefix = f"[{number}/{len(todo)}] {page.source.name}"
        try:
            options = probe.replace(sketch=load_image_file(page.source, "sketch"))
            steps = console.bar(sampling.steps, page.source.name, leave=False)
            result = colorizer.colorize(options, sampling, callback=lambda *a: steps.update(1))
            steps.close()
            written = []
            for i, (image, target) in enumerate(zip(result.images, page.images)):
                text = parameters_text(options, sampling, result.seed + i, result.width, result.height,
                                       checkpoint_name, version)
                save_png(image, target, text)
                written.append(target)
            made = [("sketch", result.sketch), ("heatmap", result.heatmap)]
            made += [(f"mask{i}", mask) for i, mask in enumerate(result.masks)]
            for kind, image in made:
                if image is not None:
                    save_png(image, page.extras[kind])
                    written.append(page.extras[kind])
            done += 1
            console.result(f"{prefix}: wrote {', '.join(str(p) for p in written)} "
                           f"({time.monotonic() - started:.1f} s)")
        except (ColorizeError, WriteFailed) as error:
            failures.append((page.source, str(error)))
            console.result(f"{prefix}: FAILED ({error})")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _summary(console, done, skipped, failures)


def _summary(console: Console, done: int, skipped: int, failures: list) -> int:
    console.result(f"{done} done, {skipped} skipped, {len(failures)} failed")
    for page, message in failures:
        console.status(f"FAILED {page}: {message}")
    return 1 if failures else 0


class _StatusHandler(logging.Handler):
    """Log records as plain status lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _quiet_libraries(console_is_terminal: bool) -> None:
    """Our loaders say what they load (``lib_colorize`` logger); the libraries' noise is not for a user."""
    library = logging.getLogger("lib_colorize")
    if not any(isinstance(h, _StatusHandler) for h in library.handlers):
        library.addHandler(_StatusHandler())
    library.setLevel(logging.INFO)
    library.propagate = False
    warnings.filterwarnings("ignore", message="Importing from timm.models")   # open_clip imports old timm paths
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    if not console_is_terminal:   # a log gets our start/end lines, not the hub's redrawn bar
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..weights import models_root

    parser = build_parser(models_root())
    args = parser.parse_args(argv)
    _quiet_libraries(bool(getattr(sys.stderr, "isatty", lambda: False)()))
    try:
        return run(args)
    except MissingWeights as error:
        hint = ""
        if str(getattr(error, "reason", "")).startswith("download failed"):
            hint = ("\n(no network here? put the file where the message says, or pass --offline so that nothing "
                    "is downloaded and a missing file is reported at once)")
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except ColorizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
