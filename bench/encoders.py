"""Encoder calls per generation, figure (d): the sketch encoder runs once per generation, and a repeated generation
with the same reference takes its tokens from the cache without running the reference encoder.

Counted with forward pre-hooks on the encoders while the real :class:`~lib_colorize.pipeline.Colorizer` colorizes
twice with one reference (different sketches and seeds; batch 2, both scales, injection on).
"""
from __future__ import annotations

import torch

from .models import generation_options, tiny_colorizer
from .sizes import BenchSize


def encoder_calls(size: BenchSize, device: torch.device, workdir: str) -> dict:
    """Per generation: encoder calls, token-cache encodes, the plan's row counts and the processor sets left
    installed; and the two figures."""
    from lib_colorize.pipeline import SamplingOptions
    from lib_colorize.processors import live_count

    colorizer = tiny_colorizer(workdir, device, towers=("visual",))
    counts = {"sketch": 0, "reference": 0}

    def counter(name):
        def hook(module, args):
            counts[name] += 1
        return hook

    handles = [colorizer.sketch_encoder.register_forward_pre_hook(counter("sketch")),
               colorizer.clip.reference.visual.conv1.register_forward_pre_hook(counter("reference"))]
    resolution = size.colorize_resolution
    generations = []
    try:
        for index in range(2):
            before, cache_before = dict(counts), colorizer.token_cache.encode_calls
            options = generation_options(resolution, injection=True, sketch_seed=index)
            sampling = SamplingOptions(steps=size.colorize_steps, seed=index + 1, width=resolution, height=resolution,
                                       batch_size=2)
            result = colorizer.colorize(options, sampling)
            generations.append({
                "sketch_encoder_calls": counts["sketch"] - before["sketch"],
                "reference_encoder_calls": counts["reference"] - before["reference"],
                "token_cache_encode_calls": colorizer.token_cache.encode_calls - cache_before,
                "stats": dict(result.stats),
                "live_hooks_after": live_count(),
            })
    finally:
        for handle in handles:
            handle.remove()
    return {
        "generations": generations,
        "sketch_encoder_calls": max(g["sketch_encoder_calls"] for g in generations),
        "reference_encoder_calls_first": generations[0]["reference_encoder_calls"],
        "reference_encoder_calls_repeat": generations[1]["reference_encoder_calls"],
    }
