"""``python -m bench``: arguments, the order of the measurements, and the report they print.

Run from the repository root. The last line of the output is the JSON line of :func:`bench.report.json_line`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import report
from .clock import clock_description
from .encoders import encoder_calls
from .endurance import endurance
from .flops import count_flops, flop_ratios
from .gpu import seconds_per_image
from .memory_workers import measure_memory
from .sizes import REFERENCE_FIDELITY, REFERENCE_GUIDANCE, SIZES, SKETCH_GUIDANCE, BenchSize
from .steps import StepBench

PROG = "python -m bench"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="ColorizeDiffusion performance benchmark; ends with one "
                                                            "JSON line of the figures.")
    parser.add_argument("--size", choices=("cpu", "full"), default="cpu",
                        help="cpu: reduced-width random U-Net (model_channels 64) at 512x512 (default); "
                             "full: the released dimensions (use a GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda for --size full when available, "
                                                       "else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="model dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per configuration "
                                                              "(default 4 cpu, 10 full, 1 quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on cpu: CPU time of one thread is the figure least "
                             "disturbed by other processes on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes, figures meaningless)")
    parser.add_argument("--seconds-per-image", action="store_true",
                        help="time whole generations at 512 and 768 (default on cuda)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory subprocesses (peak_memory_ratio is NaN)")
    parser.add_argument("--endurance", type=int, default=None, metavar="N",
                        help="only run N consecutive varied generations (tiny models) and report memory growth "
                             "and hooks left between them")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


@dataclass(frozen=True)
class Setting:
    size: BenchSize
    device: torch.device
    dtype: torch.dtype
    threads: Optional[int]   # torch CPU threads, None: torch's default
    reps: int


def resolve(args: argparse.Namespace) -> Setting:
    """The size, device, dtype, threads and repetitions the arguments mean (defaults by size and device); sets
    torch's thread count."""
    size = SIZES["quick" if args.quick else args.size]
    device = torch.device(args.device or ("cuda" if size.name == "full" and torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return Setting(size, device, dtype, threads, args.reps or size.reps)


def command_text(args: argparse.Namespace) -> str:
    """The command line of this run as the report prints it (defaults left out)."""
    text = [PROG] + (["--quick"] if args.quick else ["--size", args.size])
    for flag in ("device", "dtype", "reps", "threads"):
        value = getattr(args, flag)
        if value is not None:
            text += [f"--{flag}", str(value)]
    for flag in ("seconds_per_image", "no_memory"):
        if getattr(args, flag):
            text.append("--" + flag.replace("_", "-"))
    return " ".join(text)


def counted_sizes(size: BenchSize) -> list:
    """(label, size, resolution) of the FLOP columns: the bench size, and the released size at 512 and 768 px
    (left out of the smoke run: they do not depend on the bench size, and the tests count them)."""
    bench_size = [("bench size", size, size.resolution)]
    if size.name == "quick":
        return bench_size
    if size.name == "full":
        return bench_size + [("released size", size, 768)]
    return bench_size + [("released size", SIZES["full"], 512), ("released size", SIZES["full"], 768)]


def step_section(setting: Setting, quiet: bool, log) -> dict:
    """(a)-(c): time the step configurations, count their FLOPs, log the tables; returns the timed figures."""
    size, reps = setting.size, setting.reps
    bench = StepBench(size, setting.device, setting.dtype)
    clock = clock_description(setting.device)
    latent = size.resolution // 8
    log(f"U-Net: released layout, model_channels {bench.dims.model_channels}, context {bench.dims.context_dim}, "
        f"{len(bench.layer_scales)} transformer blocks, {bench.params / 1e6:.1f} M parameters; "
        f"{size.resolution}x{size.resolution} (latent {latent}x{latent}); {setting.device.type} "
        f"{str(setting.dtype)[6:]}; g_r {REFERENCE_GUIDANCE}, g_s {SKETCH_GUIDANCE}, phi {REFERENCE_FIDELITY}; "
        f"{reps} timed repetitions after {size.warmup} warm-up, interleaved; clock: {clock}")
    bench.measure(reps, size.warmup, log=(lambda s: None) if quiet else log)
    figures, minima = bench.figures(), bench.figures(of_minima=True)
    flops = {(label, res): count_flops(sz, res) for label, sz, res in counted_sizes(size)}
    log("")
    log(f"## (a)-(c) U-Net work per guided step ({clock}; median and min of {reps}; shared machines are noisy)")
    log(report.step_table(bench, flops[("bench size", size.resolution)]))
    log("")
    log("## ratios: measured (median of per-repetition ratios; ratio of minima) and arithmetic (FLOP counts)")
    log(report.ratio_table(bench, figures, minima, {key: flop_ratios(value) for key, value in flops.items()}))
    log(report.same_result_table(bench))
    return figures


def encoder_section(setting: Setting, log) -> dict:
    """(d) encoder calls; returns their two figures."""
    log("")
    log("## (d) encoder calls, real Colorizer, tiny random checkpoint + tiny CLIP (batch 2, both scales, injection)")
    device = setting.device if setting.device.type == "cuda" else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="cd-bench-") as workdir:
        calls = encoder_calls(setting.size, device, workdir)
    log(report.encoder_table(calls))
    return {"sketch_encoder_calls": int(calls["sketch_encoder_calls"]),
            "reference_encoder_calls_repeat": int(calls["reference_encoder_calls_repeat"])}


def memory_section(setting: Setting, log) -> float:
    """(e) peak memory; returns ``peak_memory_ratio``."""
    size = setting.size
    log("")
    log(f"## (e) peak memory growth of one generation ({size.memory_steps} steps, "
        f"{size.resolution}x{size.resolution}, batch 1, tiny VAE/sketch encoder/CLIP), one subprocess each")
    memory = measure_memory(size, setting.device, setting.dtype, threads=setting.threads, log=lambda s: None)
    log(report.memory_table(memory))
    return report.peak_memory_ratio(memory)


def seconds_section(setting: Setting, quick: bool, log) -> None:
    log("")
    log("## seconds per image (Colorizer, batch 1, dual guidance, random full-size weights, tiny CLIP)")
    rows = seconds_per_image(setting.size, setting.device, setting.dtype, resolutions=(128,) if quick else (512, 768),
                             steps=2 if quick else 20, reps=1 if quick else 2)
    log(report.seconds_table(rows))


def run(args: argparse.Namespace, log=print) -> dict:
    """The whole bench: header, (a)-(e), seconds per image where asked, the figures and their JSON line."""
    setting = resolve(args)
    machine = report.machine_description()
    log(f"# ColorizeDiffusion benchmark ({setting.size.name})")
    log(f"machine: {machine['cpu']}, {machine['cores']} cores"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"))
    log(f"commit {machine['commit']}; torch {machine['torch']}; python {machine['python']}; "
        f"command: {command_text(args)}")
    started = time.perf_counter()
    figures = step_section(setting, quiet=args.quick, log=log)
    figures.update(encoder_section(setting, log))
    figures["peak_memory_ratio"] = float("nan") if args.no_memory else memory_section(setting, log)
    if args.seconds_per_image or setting.device.type == "cuda":
        seconds_section(setting, args.quick, log)
    log("")
    log("## figures (the JSON line below)")
    log(report.figures_table(figures))
    log(f"(total {time.perf_counter() - started:.0f} s)")
    print(report.json_line(figures))
    return {key: figures[key] for key in report.JSON_KEYS}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.endurance:
            setting = resolve(args)
            with tempfile.TemporaryDirectory(prefix="cd-endurance-") as workdir:
                print(json.dumps(endurance(args.endurance, workdir, setting.device)))
        else:
            run(args)
    finally:
        torch.set_num_threads(threads)   # in-process callers (tests) keep their setting
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
