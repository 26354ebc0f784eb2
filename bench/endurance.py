"""Endurance: many consecutive varied generations through one Colorizer (``python -m bench --endurance N``).

An overnight CLI run colorizes hundreds of pages in one process, so nothing may accumulate between generations:
no processor left installed on the U-Net, no unbounded token cache, no steady memory growth. Each generation
changes the reference, guidance scales, injection, layer scales, manipulations, sampler and batch size.
"""
from __future__ import annotations

import gc
import random

import torch

from .memory import vm_kib
from .models import synthetic_image, tiny_colorizer

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DDIM")


def varied_generation(index: int, rng: random.Random):
    """The options and sampling of generation ``index``: every option that installs processors or changes the
    cache varies."""
    from lib_colorize.options import ColorizeOptions, Manipulation
    from lib_colorize.pipeline import SamplingOptions

    options = ColorizeOptions(
        enabled=True, sketch=synthetic_image(64, index), reference=synthetic_image(48, 1000 + index),
        reference_guidance=rng.choice([1.0, 3.0, 5.0]), sketch_guidance=rng.choice([1.0, 2.0]),
        injection=index % 2 == 1, layer_scales=(rng.random(),) * 16 if index % 3 == 0 else None,
        manipulations=(Manipulation(target="red", control="hair", scale=2.0),) if index % 4 == 0 else ())
    sampling = SamplingOptions(sampler=rng.choice(SAMPLERS), steps=2, seed=index, width=64, height=64,
                               batch_size=1 + index % 2)
    return options, sampling


def endurance(generations: int, workdir: str, device: torch.device, log=print) -> dict:
    """Run ``generations`` varied generations (tiny models). Reports resident memory (VmRSS) after the first
    quarter of the run (the warm-up: allocator pools and caches filling) and at the end, the growth between them,
    the most processor sets installed between two generations, and the token cache's size."""
    from lib_colorize.processors import live_count

    colorizer = tiny_colorizer(workdir, device)
    rng = random.Random(0)
    rss, hooks_between = [], []
    for index in range(generations):
        colorizer.colorize(*varied_generation(index, rng))
        hooks_between.append(live_count())
        gc.collect()
        rss.append(vm_kib("VmRSS") or 0)
    warm = rss[max(0, generations // 4 - 1)]
    result = {"generations": generations, "rss_mib_after_warmup": warm / 1024, "rss_mib_end": rss[-1] / 1024,
              "rss_growth_mib": (rss[-1] - warm) / 1024, "max_live_hooks_between": max(hooks_between),
              "token_cache_entries": len(colorizer.token_cache)}
    log(f"endurance: {generations} generations, RSS {result['rss_mib_after_warmup']:.1f} MiB after warm-up -> "
        f"{result['rss_mib_end']:.1f} MiB at the end (growth {result['rss_growth_mib']:+.1f} MiB), "
        f"live hooks between generations: {result['max_live_hooks_between']}, "
        f"token cache entries: {result['token_cache_entries']} (bounded)")
    return result
