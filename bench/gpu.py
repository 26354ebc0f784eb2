"""Seconds per image of whole generations (batch 1, dual guidance, with and without injection): the figure a user
of a GPU sees, with its peak VRAM. Random weights of the size's dimensions and a tiny CLIP."""
from __future__ import annotations

import time

import torch

from .clock import median, synchronize
from .models import bench_clip, build_checkpoint_models, generation_options
from .sizes import BenchSize, checkpoint_dims


def seconds_per_image(size: BenchSize, device: torch.device, dtype: torch.dtype, resolutions=(512, 768),
                      steps: int = 20, reps: int = 2) -> list:
    """Wall seconds of :meth:`Colorizer.colorize` per image, median of ``reps`` after one untimed generation."""
    from lib_colorize.pipeline import Colorizer, SamplingOptions

    checkpoint = build_checkpoint_models(checkpoint_dims(size), device, dtype)
    colorizer = Colorizer(checkpoint, bench_clip(size.context_dim, device), device=device, dtype=dtype)
    rows = []
    for resolution in resolutions:
        for injection in (False, True):
            options = generation_options(resolution, injection)
            sampling = SamplingOptions(steps=steps, seed=1, width=resolution, height=resolution)
            times = []
            for rep in range(reps + 1):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                start = time.perf_counter()
                colorizer.colorize(options, sampling)
                synchronize(device)
                if rep:
                    times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.append({"resolution": resolution, "injection": injection, "steps": steps,
                         "seconds": median(times), "peak_vram_bytes": peak})
    return rows
