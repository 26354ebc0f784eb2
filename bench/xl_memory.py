"""Memory of the XL models, staged against all-resident, measured side by side (``python -m bench.xl_memory``).

One generation of an ``sdxl`` checkpoint in each of two fresh processes on the CPU, at 256² by default:

* ``staged`` -- what the pipeline does (method-xl §9): the reference is encoded before the U-Net is loaded, each
  reference encoder (CLIP ViT-bigG-14, the WD tagger) loaded for its encode and dropped afterwards; then the U-Net,
  the VAE and the sketch encoder;
* ``resident`` -- everything loaded first and kept: the U-Net and the encoders together.

For each stage it records the parameter bytes resident (the tensors of the modules loaded at that point) and the
process's peak RSS (``VmHWM``, the high-water mark since the start) after the stage, and prints the ratio of the
two runs' peaks. ``--quick`` runs the same on tiny random files (CI smoke test). With ``--checkpoint`` and
``--models-dir`` it runs on real (or full-size random) files; ``bench/RESULTS.md`` records runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

CONFIGS = ("staged", "resident")


def _status_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) / 2 ** 20 if match else float("nan")


def _bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen and not tensor.is_meta:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def worker(config: str, checkpoint: str, models_dir: str, size: int, dtype_name: str, tiny: bool) -> dict:
    """One generation of ``config`` in this process; the stages' resident parameter bytes and peak RSS."""
    import torch
    from PIL import Image, ImageDraw

    from lib_colorize.options import ColorizeOptions
    from lib_colorize.pipeline import Colorizer, SamplingOptions

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    sketch = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(sketch).ellipse((size // 8, size // 8, size - size // 8, size - size // 8), outline="black",
                                  width=3)
    options = ColorizeOptions(enabled=True, sketch=sketch, reference=Image.new("RGB", (200, 260), (200, 60, 30)),
                              reference_guidance=4.0)
    extra = {}
    if tiny:
        from lib_colorize.testing.xl_checkpoints import TINY_BIGG_CONFIG

        extra["clip_config"] = TINY_BIGG_CONFIG
    stages = []

    def record(stage: str, *modules) -> None:
        stages.append({"stage": stage, "parameter_bytes": _bytes(*modules), "rss_gib": round(_status_gib("VmRSS"), 3),
                       "peak_rss_gib": round(_status_gib("VmHWM"), 3)})

    record("start")
    if config == "staged":
        encoded = {}
        colorizer = Colorizer.from_xl_files(checkpoint, models_dir=models_dir, dtype=dtype, encoder_dtype=dtype,
                                            encode_first=(options,), on_stage=lambda name: encoded.update(
                                                rss=_status_gib("VmRSS"), peak=_status_gib("VmHWM")), **extra)
        encoder = colorizer.reference_encoder
        # the encoders' own stages: the largest set of tensors resident while they ran
        stages.append({"stage": "reference encoded (before the U-Net; encoders dropped after)",
                       "parameter_bytes": max(s["parameter_bytes"] for s in encoder.stages),
                       "rss_gib": round(encoded["rss"], 3), "peak_rss_gib": round(encoded["peak"], 3)})
        record("models loaded", colorizer.unet, colorizer.vae, colorizer.sketch_encoder, colorizer.checkpoint.projector)
    else:
        colorizer = Colorizer.from_xl_files(checkpoint, models_dir=models_dir, dtype=dtype, encoder_dtype=dtype,
                                            **extra)
        encoder = colorizer.reference_encoder
        encoder.keep = "device"
        encoder._encoder("clip"), encoder._encoder("tagger")
        record("models and encoders loaded", colorizer.unet, colorizer.vae, colorizer.sketch_encoder,
               colorizer.checkpoint.projector, *encoder._loaded.values())
    result = colorizer.colorize(options, SamplingOptions(width=size, height=size, steps=1, seed=1, sampler="Euler"))
    record("generated", colorizer.unet, colorizer.vae, colorizer.sketch_encoder, colorizer.checkpoint.projector,
           *encoder._loaded.values())
    return {"config": config, "stages": stages, "peak_rss_gib": round(_status_gib("VmHWM"), 3),
            "unet_rows": result.stats["unet_rows"], "reference_encodes": encoder.encode_calls}


def _size(count: int) -> str:
    return f"{count / 2 ** 30:.2f} GiB" if count >= 2 ** 30 else f"{count / 2 ** 20:.1f} MiB"


def _tiny_files(folder: str) -> tuple[str, str]:
    from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint, make_xl_encoder_weights

    models = os.path.join(folder, "ColorizeDiffusion")
    make_xl_encoder_weights(models, seed=1)
    return make_xl_checkpoint(os.path.join(folder, "sdxl-tiny.safetensors"), "sdxl", seed=2), models


def run(checkpoint: str, models_dir: str, size: int, dtype: str, tiny: bool, out=sys.stdout,
        configs: Sequence[str] = CONFIGS) -> dict:
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for config in configs:
        command = [sys.executable, "-m", "bench.xl_memory", "--worker", config, "--checkpoint", checkpoint,
                   "--models-dir", models_dir, "--size", str(size), "--dtype", dtype] + (["--tiny"] if tiny else [])
        proc = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=7200,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        if proc.returncode:
            raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-4000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"## XL memory, {os.path.basename(checkpoint)}, {size}x{size}, {dtype}, CPU", file=out)
    print("| run | stage | parameters resident | RSS after | peak RSS so far |", file=out)
    print("|---|---|---|---|---|", file=out)
    for config, data in results.items():
        for stage in data["stages"]:
            print(f"| {config} | {stage['stage']} | {_size(stage['parameter_bytes'])} | {stage['rss_gib']:.2f} GiB | "
                  f"{stage['peak_rss_gib']:.2f} GiB |", file=out)
    figures = {f"{config}_peak_rss_gib": data["peak_rss_gib"] for config, data in results.items()}
    if len(results) == len(CONFIGS):
        ratio = results["staged"]["peak_rss_gib"] / results["resident"]["peak_rss_gib"]
        figures["peak_rss_ratio_staged"] = round(ratio, 3)
        print(f"\npeak RSS staged / resident: {ratio:.3f}", file=out)
    print(json.dumps(figures), file=out)
    return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xl_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an sdxl checkpoint (default with --quick: a tiny random one)")
    parser.add_argument("--models-dir", help="folder with open_clip_ViT-bigG-14.safetensors and "
                                             "wd-v14-swin2-tagger.safetensors")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="tiny random files (smoke test)")
    parser.add_argument("--runs", default=",".join(CONFIGS), help="which runs, comma separated (default both)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.models_dir, args.size, args.dtype, args.tiny)))
        return 0
    if args.quick:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint, models = _tiny_files(folder)
            run(checkpoint, models, 64, args.dtype, tiny=True)
        return 0
    if not (args.checkpoint and args.models_dir):
        parser.error("--checkpoint and --models-dir are needed (or --quick)")
    run(args.checkpoint, args.models_dir, args.size, args.dtype, tiny=False,
        configs=[c for c in args.runs.split(",") if c in CONFIGS])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
