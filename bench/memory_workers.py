"""Peak memory of one generation per configuration, figure (e), each in a fresh subprocess.

Configurations: ``plain`` (two-row CFG on the U-Net without processors, same sampler, steps and VAE decode: the
baseline), ``dual`` (both scales), ``ours`` (both scales + injection, the library's), ``original`` (both scales +
the original's injection, :mod:`bench.original`). Each worker runs a warm-up generation (one-time allocations of
the kernels) and then the measured one, split into segments: ``conditioning`` (up to the first U-Net call: sketch
and reference encoders, VAE encode), ``sampling`` (the sampler loop) and ``decode`` (the VAE decode and the rest).

A fresh process per configuration keeps one configuration's allocator state out of the next one's peak. A worker
is ``python -m bench.memory_workers CONFIG --size ...``, started from the repository root with it on
``PYTHONPATH`` (it imports both ``bench`` and ``lib_colorize``); its last output line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

import torch

from .memory import PeakTracker, tracking_method
from .models import bench_clip, build_checkpoint_models, generation_options
from .sizes import REFERENCE_GUIDANCE, SIZES, BenchSize, checkpoint_dims

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("plain", "dual", "ours", "original")

StepDone = Callable[..., None]


def plain_cfg_generation(checkpoint, size: BenchSize, device, dtype) -> Callable[[StepDone], object]:
    """Two-row CFG with the same sampler, steps and VAE decode as the Colorizer, no processors."""
    from lib_colorize.models import LATENT_SCALE
    from lib_colorize.samplers import get_sampler, initial_noise
    from lib_colorize.schedule import NoiseSchedule, make_denoiser

    unet, vae = checkpoint.unet, checkpoint.vae
    schedule, sampler = NoiseSchedule.scaled_linear(), get_sampler("DPM++ 2M")
    tokens = torch.randn(1, 256, size.context_dim, generator=torch.Generator().manual_seed(0))
    context = torch.cat([tokens, torch.zeros_like(tokens)]).to(device=device, dtype=dtype)
    denoiser = make_denoiser(lambda x_in, t, context: unet(x_in.to(dtype), t, context).float(), "eps", schedule)

    def model(x, sigma):
        uncond, cond = denoiser(x.repeat(2, 1, 1, 1), sigma.repeat(2), context=context).chunk(2)[::-1]
        return uncond + REFERENCE_GUIDANCE * (cond - uncond)

    def generate(step_done: StepDone):
        sigmas = schedule.get_sigmas(size.memory_steps, sampler.schedule).to(device)
        latent = size.resolution // 8
        x = initial_noise((1, 4, latent, latent), 1, float(sigmas[0]), device=device)
        latents = sampler.func(model, x, sigmas, callback=step_done)
        return vae.decode((latents / LATENT_SCALE).to(dtype))
    return generate


def colorizer_generation(config: str, checkpoint, size: BenchSize, device, dtype) -> Callable[[StepDone], object]:
    """A Colorizer generation, both scales on; injection for ``ours`` and ``original``."""
    from bench.original import OriginalColorizer
    from lib_colorize.pipeline import Colorizer, SamplingOptions

    colorizer_class = OriginalColorizer if config == "original" else Colorizer
    colorizer = colorizer_class(checkpoint, bench_clip(size.context_dim, device), device=device, dtype=dtype)
    resolution = size.resolution
    options = generation_options(resolution, injection=config in ("ours", "original"))
    sampling = SamplingOptions(steps=size.memory_steps, seed=1, width=resolution, height=resolution, batch_size=1)
    return lambda step_done: colorizer.colorize(options, sampling, callback=step_done)


def peak_of_generation(config: str, size: BenchSize, device: torch.device, dtype: torch.dtype) -> dict:
    """Run in the worker process: the peak memory growth of one generation of ``config`` after a warm-up one."""
    checkpoint = build_checkpoint_models(checkpoint_dims(size), device, dtype)
    if config == "plain":
        generate = plain_cfg_generation(checkpoint, size, device, dtype)
    else:
        generate = colorizer_generation(config, checkpoint, size, device, dtype)
    tracker: Optional[PeakTracker] = None
    sampling_started = False

    def first_unet_call(module, args):
        nonlocal sampling_started
        if tracker is not None and not sampling_started:
            sampling_started = True
            tracker.mark("conditioning")

    def step_done(step, total, *_):
        if tracker is not None and step == total - 1:
            tracker.mark("sampling")

    checkpoint.unet.register_forward_pre_hook(first_unet_call)
    runs = []
    with torch.inference_mode():
        for _ in range(2):   # warm-up, then the measured generation
            sampling_started = False
            with PeakTracker(device) as tracker:
                generate(step_done)
                tracker.mark("decode")
            runs.append({"peaks": dict(tracker.peaks), "retained": tracker.retained})
            tracker = None
    measured = runs[-1]
    return {"config": config, "method": tracking_method(device),
            "peak_bytes": max(measured["peaks"].values()), "segments": measured["peaks"],
            "first_run_peak_bytes": max(runs[0]["peaks"].values()), "retained_bytes": measured["retained"]}


def worker_environment() -> dict:
    """The worker's environment: the repository root first on ``PYTHONPATH``; glibc serves large blocks by
    ``mmap`` and returns them on free, so that RSS follows the live tensors."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPOSITORY_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    return env


def worker_command(config: str, size: BenchSize, device: torch.device, dtype: torch.dtype,
                   threads: Optional[int]) -> list:
    return [sys.executable, "-m", "bench.memory_workers", config, "--size", size.name, "--device", str(device),
            "--dtype", str(dtype).replace("torch.", ""), *(["--threads", str(threads)] if threads else [])]


def measure_memory(size: BenchSize, device: torch.device, dtype: torch.dtype, threads: Optional[int] = None,
                   configs: Optional[Sequence[str]] = None, log=print) -> dict:
    """Peak memory of each configuration (default: the size's), one worker subprocess each: ``{config: result}``."""
    env, results = worker_environment(), {}
    for config in configs or size.memory_configs:
        proc = subprocess.run(worker_command(config, size, device, dtype, threads), cwd=REPOSITORY_ROOT, env=env,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {config} failed:\n{proc.stderr[-4000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  memory {config}: peak {results[config]['peak_bytes'] / 2 ** 20:.1f} MiB")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_workers",
                                     description="One peak-memory worker of python -m bench (prints one JSON line).")
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--size", choices=tuple(SIZES), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = peak_of_generation(args.config, SIZES[args.size], torch.device(args.device), getattr(torch, args.dtype))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
