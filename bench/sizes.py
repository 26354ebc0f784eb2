"""Bench sizes, the guidance setting every measured configuration runs with, and the checkpoint dims of a size.

``cpu`` (default) is the released U-Net layout at reduced width (model_channels 64, 16 transformer blocks, context
1024) at 512x512 (latent 64x64). ``full`` is the released dimensions (use a GPU). ``quick`` is a smoke size (tiny
U-Net, 64x64, one repetition) whose figures only prove that the bench runs.

A narrow U-Net spends a larger share of its work in self-attention than the released one (attention grows with
tokens² x width, convolutions with tokens x width²), so the injection ratios at ``cpu`` size are higher than the
released model's at the same resolution; the FLOP columns of the report show both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lib_colorize.testing.checkpoints import FULL, Dims, tiny_dims

REFERENCE_GUIDANCE = 5.0   # g_r
SKETCH_GUIDANCE = 2.0      # g_s: both scales on, so every guided step evaluates three row groups
REFERENCE_FIDELITY = 0.5   # φ: the reference-dropped rows blend plain and injected self-attention


@dataclass(frozen=True)
class BenchSize:
    name: str
    model_channels: int
    context_dim: int
    resolution: int           # pixels (square); latent = resolution // 8
    reps: int                 # default timed repetitions of the step configurations
    warmup: int
    memory_steps: int         # sampler steps of each memory generation
    memory_configs: tuple     # generations measured for peak memory, "plain" first
    colorize_resolution: int  # of the tiny Colorizer runs that count encoder calls
    colorize_steps: int


SIZES = {
    "cpu": BenchSize("cpu", 64, 1024, 512, 4, 1, 1, ("plain", "dual", "ours", "original"), 256, 2),
    "full": BenchSize("full", 320, 1024, 512, 10, 2, 4, ("plain", "dual", "ours", "original"), 256, 2),
    "quick": BenchSize("quick", 32, 64, 64, 1, 1, 1, ("plain", "ours"), 64, 1),
}


def checkpoint_dims(size: BenchSize) -> Dims:
    """Checkpoint dimensions of a bench size: the released layout, with sketch-encoder hints as wide as the U-Net's
    levels."""
    if size.name == "full":
        return dataclasses.replace(FULL, context_dim=size.context_dim)
    mc = size.model_channels
    base = tiny_dims(size.context_dim)
    return dataclasses.replace(base, model_channels=mc, sketch_stem=base.sketch_stem[:-1] + (mc,),
                               sketch_hints=(mc, 2 * mc, 4 * mc, 4 * mc))
