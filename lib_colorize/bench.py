"""Performance benchmark of issue 6: ``python -m lib_colorize.bench``.

Measures, side by side in one run (configurations interleaved across repetitions, alternating order, medians):

(a) ``dual_guidance_ratio``: U-Net work per guided step with both scales on (3 rows, through
    :func:`~lib_colorize.denoiser.guided_call` on our hooked U-Net) over plain two-row CFG on the same unhooked U-Net.
    Floor 1.5 (3 rows over 2); target <= 1.55.
(b) ``injection_ratio_b{1,4}``: injection on over injection off per guided step, both scales on, batch 1 and 4,
    with our distinct-rows reference pass; ``injection_ratio_original_b{1,4}`` the same with the original's
    full-batch reference pass (``InjectionPlan(full_batch=True)``, method §6.2). Target: ours <= 0.85 (b1) and
    <= 0.70 (b4) of the original's ratio.
(c) ``hook_overhead_ratio``: our hooked U-Net (hints + non-unit layer scales) at batch 3 over the same U-Net unhooked
    at batch 3. Target <= 1.03.
(d) ``sketch_encoder_calls`` (per generation, target exactly 1) and ``reference_encoder_calls_repeat`` (on a repeated
    generation with the same reference, target 0), counted with forward hooks on the encoders while the real
    :class:`~lib_colorize.pipeline.Colorizer` colorizes with a tiny random checkpoint (released key layout) and a
    tiny open_clip tower written to a temporary folder.
(e) ``peak_memory_ratio``: peak memory of a generation (both scales + injection, :class:`Colorizer`) over that of
    a plain two-row-CFG generation with the same unhooked U-Net, sampler, steps and VAE decode, both after a
    warm-up generation. One subprocess per configuration; the table splits each peak into conditioning, sampling
    loop and decode. CPU: growth of the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; glibc is told
    to give large blocks back with ``MALLOC_MMAP_THRESHOLD_``); CUDA: ``torch.cuda.max_memory_allocated``.

Clock: on CPU the bench runs torch on one thread (``--threads``) and times process CPU seconds, the figure least
disturbed by other processes on a shared machine (with two threads, a busy neighbour core stalls every OpenMP
barrier); on CUDA, wall seconds between synchronisations. Timed ratios are medians of per-repetition ratios (the
two terms of each ratio run next to each other); the table adds the ratio of the minima and the **arithmetic**
ratios (FLOPs of every configuration counted with ``torch.utils.flop_counter`` on the meta device, for the bench
size and for the released size at 512 and 768, which costs no compute): these are the noise-free floors.

Sizes: ``--size cpu`` (default) is the released U-Net layout at reduced width (model_channels 64, 16 transformer
blocks, context 1024) at 512x512 (latent 64x64); ``--size full`` the released dimensions (use a GPU; adds seconds
per image at 512 and 768 and peak VRAM); ``--quick`` a CI-sized smoke run (tiny U-Net, 128x128) whose figures only
prove that the bench runs.

A narrow U-Net spends a larger share of its work in self-attention than the released one (attention grows with
tokens² x width, convolutions with tokens x width²), so the injection ratios at ``--size cpu`` are higher than the
released model's at the same resolution (compare the FLOP columns).

"ours" is the library as the pipeline runs it: the distinct-rows reference pass, which stops once the last
transformer block's ``attn1`` has filled the bank (``ColorizeHooks(stop_write_early=True)``), and the read pass in
which the reference-dropped rows get their φ-blend of plain and injected self-attention from two ``N``-key
attentions merged by log-sum-exp (``merge_fidelity=True``, :mod:`lib_colorize.attention`). "original" is the
original's algorithm (method §6.2-§6.3): the full-batch reference pass through the whole U-Net, and a separate
plain self-attention of the reference-dropped rows next to their injected one over ``2N`` keys.

The last line of the output is one JSON object with exactly the keys of :data:`JSON_KEYS`.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch

JSON_KEYS = (
    "dual_guidance_ratio",
    "hook_overhead_ratio",
    "injection_ratio_b1",
    "injection_ratio_b4",
    "injection_ratio_original_b1",
    "injection_ratio_original_b4",
    "sketch_encoder_calls",
    "reference_encoder_calls_repeat",
    "peak_memory_ratio",
)

TARGETS = {
    "dual_guidance_ratio": "<= 1.55 (floor 1.5)",
    "hook_overhead_ratio": "<= 1.03",
    "sketch_encoder_calls": "== 1",
    "reference_encoder_calls_repeat": "== 0",
}

REFERENCE_GUIDANCE = 5.0
SKETCH_GUIDANCE = 2.0
REFERENCE_FIDELITY = 0.5
BENCH_CLIP_NAME = "cd-bench-clip"


@dataclass(frozen=True)
class BenchSize:
    name: str
    model_channels: int
    context_dim: int
    resolution: int          # pixels (square); latent = resolution // 8
    reps: int                # default repetitions of the step timings
    warmup: int
    memory_steps: int        # sampler steps of each memory generation
    memory_configs: tuple    # generation configurations measured in (e), "plain" first
    colorize_resolution: int  # (d): tiny Colorizer runs
    colorize_steps: int


SIZES = {
    "cpu": BenchSize("cpu", 64, 1024, 512, 4, 1, 1, ("plain", "dual", "ours", "original"), 256, 2),
    "full": BenchSize("full", 320, 1024, 512, 10, 2, 4, ("plain", "dual", "ours", "original"), 256, 2),
    "quick": BenchSize("quick", 32, 64, 128, 2, 1, 1, ("plain", "ours"), 128, 1),
}


# ---------------------------------------------------------------------------------------------------------------------
# Models


def bench_dims(size: BenchSize):
    """Checkpoint dimensions of a bench size (released layout; sketch encoder hints match the U-Net widths)."""
    from .testing.checkpoints import FULL, tiny_dims

    if size.name == "full":
        return dataclasses.replace(FULL, context_dim=size.context_dim)
    mc = size.model_channels
    base = tiny_dims(size.context_dim)
    return dataclasses.replace(base, model_channels=mc, sketch_stem=base.sketch_stem[:-1] + (mc,),
                               sketch_hints=(mc, 2 * mc, 4 * mc, 4 * mc))


def _random_state(layout: dict, seed: int) -> dict:
    from .testing.checkpoints import random_tensor

    return {key: random_tensor(key, shape, kind, seed) for key, (shape, kind) in layout.items()
            if not kind.startswith("buffer:")}


def build_unet(dims, device, dtype, seed: int = 0):
    """Random U-Net of ``dims`` in the released key layout (loaded with ``strict=True``)."""
    from .models import UNetModel
    from .testing.checkpoints import unet_layout

    state = _random_state(unet_layout(dims), seed)
    unet = UNetModel.from_state_dict(state)
    del state
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_checkpoint_models(dims, device, dtype, seed: int = 0) -> SimpleNamespace:
    """U-Net, VAE and sketch encoder built in memory from the released layout, shaped like a loaded checkpoint."""
    from .models import AutoencoderKL, SketchEncoder
    from .testing.checkpoints import sketch_encoder_layout, vae_layout

    unet = build_unet(dims, device, dtype, seed)
    vae = AutoencoderKL.from_state_dict(_random_state(vae_layout(dims), seed))
    sketch = SketchEncoder.from_state_dict(_random_state(sketch_encoder_layout(dims), seed))
    return SimpleNamespace(
        unet=unet,
        vae=vae.to(device=device, dtype=dtype).eval().requires_grad_(False),
        sketch_encoder=sketch.to(device=device, dtype=dtype).eval().requires_grad_(False),
        info=SimpleNamespace(version="v1", parameterization="eps"))


def load_checkpoint_file(path: str, device, dtype) -> SimpleNamespace:
    """The project's checkpoint loader when present, else a minimal one over the released prefixes."""
    try:
        from .checkpoint import load_checkpoint  # type: ignore[attr-defined]
    except ImportError:
        load_checkpoint = None
    if load_checkpoint is not None:
        return load_checkpoint(path, dtype=dtype, device=device)
    from safetensors.torch import load_file

    from .models import AutoencoderKL, SketchEncoder, UNetModel
    from .testing.checkpoints import SKETCH_PREFIX, UNET_PREFIX, VAE_PREFIX

    state = load_file(path)

    def part(prefix):
        return {k[len(prefix):]: v.to(dtype) for k, v in state.items() if k.startswith(prefix)}

    return SimpleNamespace(
        unet=UNetModel.from_state_dict(part(UNET_PREFIX)).to(device).eval().requires_grad_(False),
        vae=AutoencoderKL.from_state_dict(part(VAE_PREFIX)).to(device).eval().requires_grad_(False),
        sketch_encoder=SketchEncoder.from_state_dict(part(SKETCH_PREFIX)).to(device).eval().requires_grad_(False),
        info=SimpleNamespace(version="v1", parameterization="eps"))


def bench_clip(context_dim: int, device, seed: int = 0):
    """A tiny open_clip image tower whose tokens are ``context_dim`` wide (the released U-Net's is 1024)."""
    import open_clip

    from .models.clip import ClipEncoders, ReferenceEncoder
    from .testing.clip import TINY_CLIP_CONFIG, register_tiny_clip

    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["embed_dim"] = int(context_dim)
    name = f"{BENCH_CLIP_NAME}-{context_dim}"
    register_tiny_clip(name, config)
    torch.manual_seed(seed)
    reference = ReferenceEncoder(open_clip.create_model(name, pretrained=None))
    reference = reference.to(device).eval().requires_grad_(False)
    return ClipEncoders(reference=reference, text=None, weights_path="", arch=name)


def synthetic_image(size: int, seed: int):
    """A deterministic RGB test image (smooth colour field with dark strokes), size x size."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    channels = [np.sin(2 * math.pi * (rng.rand() * 2 * xx + rng.rand() * 2 * yy + rng.rand())) for _ in range(3)]
    image = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    for _ in range(8):
        row = rng.randint(0, size)
        image[max(0, row - 1):row + 1] = 20
    return Image.fromarray(image.astype("uint8"))


# ---------------------------------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass
class StepConfig:
    name: str
    label: str
    run: Callable[[], torch.Tensor]
    hooks: object = None            # ColorizeHooks installed around each call (outside the timer)
    plan: object = None             # GenerationPlan (its stats count rows)
    rows: Optional[int] = None      # U-Net rows per call of the configurations without a plan
    calls: int = 0
    times: List[float] = dataclasses.field(default_factory=list)   # CPU seconds (CPU) or wall seconds (CUDA)
    wall: List[float] = dataclasses.field(default_factory=list)
    output: Optional[torch.Tensor] = None

    def call(self) -> torch.Tensor:
        if self.hooks is not None:
            self.hooks.install()
        try:
            out = self.run()
        finally:
            if self.hooks is not None:
                self.hooks.remove()
        self.calls += 1
        return out

    def rows_per_step(self) -> Optional[float]:
        if self.plan is None or not self.calls:
            return self.rows
        return (self.plan.stats["unet_rows"] + self.plan.stats["write_rows"]) / self.calls


class StepBench:
    """(a)-(c): the U-Net work of one guided step, through ``guided_call`` with an inner model calling the U-Net."""

    def __init__(self, size: BenchSize, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, unet=None, resolution: Optional[int] = None):
        from .guidance import guidance_mode, row_roles
        from .processors import HINT_BLOCKS

        self.size, self.device, self.dtype = size, device, dtype
        self.dims = bench_dims(size)
        self.unet = unet if unet is not None else build_unet(self.dims, device, dtype, seed)
        self.params = sum(p.numel() for p in self.unet.parameters())
        latent = (resolution or size.resolution) // 8
        gen = torch.Generator().manual_seed(seed + 1)

        def randn(*shape, scale=1.0):
            return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

        # shapes of the hint levels: outputs of input_blocks[0, 3, 6, 9, 11] (method §3)
        shapes = {}
        handles = [self.unet.input_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: shapes.__setitem__(i, tuple(out.shape[1:]))) for i in HINT_BLOCKS]
        with torch.inference_mode():
            self.unet(randn(1, 4, latent, latent), torch.tensor([500.0], device=device),
                      randn(1, 4, size.context_dim))
        for handle in handles:
            handle.remove()
        self.sketch_hints = [randn(1, *shapes[i], scale=0.1) for i in HINT_BLOCKS]
        self.blank_hints = [randn(1, *shapes[i], scale=0.1) for i in HINT_BLOCKS]
        self.tokens = randn(1, 256, size.context_dim)
        self.reference_latent = randn(1, 4, latent, latent)
        self.x = {b: randn(b, 4, latent, latent) for b in (1, 4)}
        self.t = torch.tensor([500.0], device=device)
        self.sigma = torch.tensor([1.0], device=device)
        self.mode = guidance_mode(REFERENCE_GUIDANCE, SKETCH_GUIDANCE)
        self.roles = row_roles(self.mode)
        self.layer_scales = [0.8 + 0.025 * i for i in range(16)]   # non-unit, all 16 blocks
        self.configs: Dict[str, StepConfig] = {}
        self._build_configs()

    # -- configurations ----------------------------------------------------------------------------------------
    def _plan(self, injection: Optional[str]):
        from .denoiser import GenerationPlan, InjectionPlan

        inj = None
        if injection is not None:
            # every image gets the same latent and ε stream, so ours and the original's shared draw agree
            batch = max(self.x)
            inj = InjectionPlan(reference_latents=self.reference_latent.expand(batch, -1, -1, -1), hints=None,
                                noise_generators=[torch.Generator() for _ in range(batch)],
                                reference_fidelity=REFERENCE_FIDELITY, start=0.0)
        return GenerationPlan(mode=self.mode, reference_guidance=REFERENCE_GUIDANCE,
                              sketch_guidance=SKETCH_GUIDANCE, reference_tokens=self.tokens,
                              sketch_hints=self.sketch_hints, blank_hints=self.blank_hints, injection=inj)

    def _inner_model(self, x_in, sigma_in, context):
        return self.unet(x_in, self.t, context)

    def _noised_reference(self, latent, sigma, noise):
        return latent + sigma.reshape(-1, 1, 1, 1).to(latent) * noise

    def _guided(self, plan, hooks, batch: int, call=None) -> Callable[[], torch.Tensor]:
        from .denoiser import guided_call

        call = call or guided_call
        x = self.x[batch]

        def run():
            if plan.injection is not None:
                for generator in plan.injection.noise_generators:
                    generator.manual_seed(1234)   # same ε in every configuration
            return call(plan, hooks, self._inner_model, x, self.sigma, 500.0,
                        noised_reference=self._noised_reference)
        return run

    def _build_configs(self) -> None:
        from bench.original import original_guided_call, original_processors

        from .denoiser import row_contexts, row_hints
        from .processors import UNetCall, for_generation

        unet = self.unet
        x1 = self.x[1]
        tokens = self.tokens
        ctx2 = torch.cat([tokens, torch.zeros_like(tokens)])
        x2 = x1.repeat(2, 1, 1, 1)
        plan_off = self._plan(None)
        ctx3 = row_contexts(plan_off, self.roles, 1, True)
        hints3 = row_hints(plan_off, self.roles, 1)
        x3 = x1.repeat(3, 1, 1, 1)

        def plain_cfg():
            uncond, cond = unet(x2, self.t, ctx2).chunk(2)[::-1]
            return uncond + REFERENCE_GUIDANCE * (cond - uncond)

        def plain3():
            return unet(x3, self.t, ctx3)

        hooked = for_generation(unet, layer_scales=self.layer_scales)

        def hooked3():
            with hooked.call(UNetCall(sketch_hints=hints3)):
                return unet(x3, self.t, ctx3)

        # order: the two terms of every ratio are measured next to each other
        add = self._add
        add("plain3", "unhooked U-Net, 3 rows", plain3, rows=3)
        add("hooked3", "hooked U-Net (hints + layer scales), 3 rows", hooked3, hooks=hooked, rows=3)
        add("cfg2", "plain two-row CFG, unhooked U-Net (b1)", plain_cfg, rows=2)
        for batch in (1, 4):
            for kind, label in ((None, "injection off"), ("ours", "injection on, ours (distinct rows)"),
                                ("original", "injection on, original (full batch)")):
                plan = self._plan(kind)
                make = original_processors if kind == "original" else for_generation
                hooks = make(unet, layer_scales=self.layer_scales, injection=kind is not None)
                call = original_guided_call if kind == "original" else None
                name = f"{kind or 'off'}_b{batch}"
                add(name, f"dual guidance, {label} (b{batch})", self._guided(plan, hooks, batch, call),
                    hooks=hooks, plan=plan)

    def _add(self, name, label, run, hooks=None, plan=None, rows=None):
        self.configs[name] = StepConfig(name, label, run, hooks=hooks, plan=plan, rows=rows)

    # -- measurement -------------------------------------------------------------------------------------------
    def measure(self, reps: int, warmup: int, log=print) -> None:
        """Warm-up, then ``reps`` repetitions of every configuration, in alternating order.

        CPU: process CPU time (the bench runs torch on one thread by default, so time slices taken by other
        processes on a shared machine are not counted); CUDA: wall time between synchronisations.
        """
        names = list(self.configs)
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        with torch.inference_mode():
            for _ in range(max(1, warmup)):
                for name in names:
                    self.configs[name].output = self.configs[name].call()
            for rep in range(reps):
                order = names if rep % 2 == 0 else names[::-1]   # alternate the order against drift
                for name in order:
                    config = self.configs[name]
                    _sync(self.device)
                    wall, start = time.perf_counter(), clock()
                    config.call()
                    _sync(self.device)
                    config.times.append(clock() - start)
                    config.wall.append(time.perf_counter() - wall)
                log(f"  repetition {rep + 1}/{reps} done")

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over repetitions of the per-repetition ratio (both measured in the same repetition)."""
        num, den = self.configs[numerator].times, self.configs[denominator].times
        return _median([a / b for a, b in zip(num, den)])

    def ratio_of_minima(self, numerator: str, denominator: str) -> float:
        """min(numerator) / min(denominator): the least disturbed measurement of each (noise only adds)."""
        return min(self.configs[numerator].times) / min(self.configs[denominator].times)

    def max_abs_diff(self, a: str, b: str) -> Optional[float]:
        out_a, out_b = self.configs[a].output, self.configs[b].output
        if out_a is None or out_b is None:
            return None
        return float((out_a.float() - out_b.float()).abs().max())


def arithmetic(size: BenchSize, resolution: int) -> dict:
    """Noise-free floors: multiply-add FLOPs of every step configuration, counted on the meta device.

    Counts matmuls, convolutions and attention (``torch.utils.flop_counter``; attention decomposes to bmm on
    meta). The U-Net has the released module tree with ``size``'s widths and no real weights, so the full size
    costs nothing to count. Returns ``{config: flops}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .models import UNetConfig, UNetModel

    dims = bench_dims(size)
    with torch.device("meta"):
        unet = UNetModel(UNetConfig(model_channels=dims.model_channels, channel_mult=dims.channel_mult,
                                    num_res_blocks=dims.num_res_blocks, attention_levels=dims.attention_levels,
                                    context_dim=dims.context_dim)).eval()
    step = StepBench(size, torch.device("meta"), torch.float32, unet=unet,
                     resolution=resolution)
    flops = {}
    with torch.no_grad():   # FlopCounterMode sees nothing under inference_mode (torch 2.1)
        for name, config in step.configs.items():
            with FlopCounterMode(display=False) as counter:
                config.call()
            flops[name] = counter.get_total_flops()
    return flops


def arithmetic_figures(flops: dict) -> dict:
    figures = {
        "dual_guidance_ratio": flops["off_b1"] / flops["cfg2"],
        "hook_overhead_ratio": flops["hooked3"] / flops["plain3"],
        "injection_ratio_b1": flops["ours_b1"] / flops["off_b1"],
        "injection_ratio_b4": flops["ours_b4"] / flops["off_b4"],
        "injection_ratio_original_b1": flops["original_b1"] / flops["off_b1"],
        "injection_ratio_original_b4": flops["original_b4"] / flops["off_b4"],
    }
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# (d) encoder calls through the real Colorizer


def encoder_calls(size: BenchSize, device: torch.device, workdir: str) -> dict:
    """Colorize twice with one reference (different sketches and seeds) and count the encoders' forward calls."""
    from .processors import live_count as live_hook_count
    from .models.clip import load_clip
    from .options import ColorizeOptions
    from .pipeline import Colorizer, SamplingOptions
    from .testing.checkpoints import make_checkpoint
    from .testing.clip import TINY_CLIP_NAME, make_tiny_clip_weights

    ckpt_path = make_checkpoint(os.path.join(workdir, "mult-eps-bench-tiny.safetensors"), "v1", "tiny",
                                context_dim=32)   # the tiny CLIP's token width
    clip_path = make_tiny_clip_weights(os.path.join(workdir, "open_clip_pytorch_model.bin"))
    checkpoint = load_checkpoint_file(ckpt_path, device, torch.float32)
    clip = load_clip(TINY_CLIP_NAME, weights=clip_path, device=device, towers=("visual",))
    colorizer = Colorizer(checkpoint, clip, device=device, dtype=torch.float32)

    counts = {"sketch": 0, "reference": 0}
    handles = [
        colorizer.sketch_encoder.register_forward_pre_hook(lambda m, a: counts.__setitem__("sketch",
                                                                                            counts["sketch"] + 1)),
        clip.reference.visual.conv1.register_forward_pre_hook(lambda m, a: counts.__setitem__(
            "reference", counts["reference"] + 1)),
    ]
    reference = synthetic_image(size.colorize_resolution, 100)
    generations = []
    try:
        for index in range(2):
            before = dict(counts)
            cache_before = colorizer.token_cache.encode_calls
            options = ColorizeOptions(enabled=True, sketch=synthetic_image(size.colorize_resolution, index),
                                      reference=reference, reference_guidance=REFERENCE_GUIDANCE,
                                      sketch_guidance=SKETCH_GUIDANCE, injection=True)
            sampling = SamplingOptions(steps=size.colorize_steps, seed=index + 1, width=size.colorize_resolution,
                                       height=size.colorize_resolution, batch_size=2)
            result = colorizer.colorize(options, sampling)
            generations.append({
                "sketch_encoder_calls": counts["sketch"] - before["sketch"],
                "reference_encoder_calls": counts["reference"] - before["reference"],
                "token_cache_encode_calls": colorizer.token_cache.encode_calls - cache_before,
                "stats": dict(result.stats),
                "live_hooks_after": live_hook_count(),
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


def endurance(generations: int, workdir: str, device: torch.device, log=print) -> dict:
    """Issue 7: many consecutive generations with varying inputs through one Colorizer (tiny models).

    Each generation changes the reference, guidance mode, injection, layer scales, manipulations and the
    batch size; between generations no hook may remain. Reports resident memory (VmRSS) after the first
    quarter of the run (warm-up: allocator pools, caches filling) and at the end, and the growth between them.
    """
    import gc
    import random as _random

    from .processors import live_count as live_hook_count
    from .models.clip import load_clip
    from .options import ColorizeOptions, Manipulation
    from .pipeline import Colorizer, SamplingOptions
    from .testing.checkpoints import make_checkpoint
    from .testing.clip import TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip

    register_tiny_clip()
    ckpt_path = make_checkpoint(os.path.join(workdir, "mult-eps-endurance.safetensors"), "v1", "tiny",
                                context_dim=32)
    clip_path = make_tiny_clip_weights(os.path.join(workdir, "open_clip_pytorch_model.bin"))
    colorizer = Colorizer(load_checkpoint_file(ckpt_path, device, torch.float32),
                          load_clip(TINY_CLIP_NAME, weights=clip_path, device=device), device=device)
    rng = _random.Random(0)
    rss, hooks_between = [], []
    for index in range(generations):
        options = ColorizeOptions(
            enabled=True, sketch=synthetic_image(64, index), reference=synthetic_image(48, 1000 + index),
            reference_guidance=rng.choice([1.0, 3.0, 5.0]), sketch_guidance=rng.choice([1.0, 2.0]),
            injection=index % 2 == 1, layer_scales=(rng.random(),) * 16 if index % 3 == 0 else None,
            manipulations=(Manipulation(target="red", control="hair", scale=2.0),) if index % 4 == 0 else ())
        sampling = SamplingOptions(sampler=rng.choice(["Euler", "Euler a", "DPM++ 2M", "DDIM"]), steps=2,
                                   seed=index, width=64, height=64, batch_size=1 + index % 2)
        colorizer.colorize(options, sampling)
        hooks_between.append(live_hook_count())
        gc.collect()
        rss.append(_vm_kib("VmRSS") or 0)
    warm = rss[max(0, generations // 4 - 1)]
    result = {"generations": generations, "rss_mib_after_warmup": warm / 1024, "rss_mib_end": rss[-1] / 1024,
              "rss_growth_mib": (rss[-1] - warm) / 1024, "max_live_hooks_between": max(hooks_between),
              "token_cache_entries": len(colorizer.token_cache)}
    log(f"endurance: {generations} generations, RSS {result['rss_mib_after_warmup']:.1f} MiB after warm-up -> "
        f"{result['rss_mib_end']:.1f} MiB at the end (growth {result['rss_growth_mib']:+.1f} MiB), "
        f"live hooks between generations: {result['max_live_hooks_between']}, "
        f"token cache entries: {result['token_cache_entries']} (bounded)")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# (e) peak memory, one subprocess per configuration


def _vm_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler:
    """Peak VmRSS (KiB) sampled every millisecond by a background thread."""

    def __enter__(self):
        import threading

        self.peak = _vm_kib("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _vm_kib("VmRSS") or 0)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _vm_kib("VmRSS") or 0)


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakTracker:
    """Peak memory growth per segment of a run, over the memory in use when the run started.

    ``cuda``: ``torch.cuda.max_memory_allocated``; CPU: the peak RSS ``VmHWM`` (reset through
    ``/proc/self/clear_refs``), or VmRSS sampled every millisecond where that reset is refused. Bytes.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda"
        elif _vm_kib("VmRSS") is None:
            self.method = "unavailable"
        else:
            self.method = "VmHWM" if _reset_peak_rss() else "VmRSS sampled"
        self._sampler = None
        self.base = 0
        self.peaks: Dict[str, float] = {}

    def _current(self) -> int:
        if self.method == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return 1024 * (_vm_kib("VmRSS") or 0)

    def _reset(self) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "VmHWM":
            _reset_peak_rss()
        elif self._sampler is not None:
            self._sampler.peak = self._current() // 1024

    def _peak(self) -> int:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "VmHWM":
            return 1024 * (_vm_kib("VmHWM") or 0)
        if self._sampler is not None:
            return 1024 * max(self._sampler.peak, _vm_kib("VmRSS") or 0)
        return 0

    def __enter__(self) -> "PeakTracker":
        _release_memory()
        if self.method == "VmRSS sampled":
            self._sampler = _RssSampler().__enter__()
        self.base = self._current()
        self.peaks = {}
        self._reset()
        return self

    def mark(self, segment: str) -> None:
        """Close ``segment`` (its peak is the peak since the previous mark) and start the next one."""
        if self.method == "unavailable":
            self.peaks[segment] = float("nan")
            return
        self.peaks[segment] = max(self.peaks.get(segment, 0), self._peak() - self.base)
        self._reset()

    def __exit__(self, *exc_info) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            self._sampler = None
        _release_memory()
        self.retained = self._current() - self.base


def memory_worker(config: str, size: BenchSize, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory growth of one generation of ``config`` (run in a fresh process), after a warm-up generation.

    Segments: ``conditioning`` (up to the first U-Net call: sketch/reference encoders, VAE encode), ``sampling``
    (the sampler loop), ``decode`` (the VAE decode and the rest). The generation's peak is their maximum.
    """
    from .models import LATENT_SCALE
    from .options import ColorizeOptions
    from .pipeline import Colorizer, SamplingOptions
    from .samplers import get_sampler, initial_noise
    from .schedule import NoiseSchedule, make_denoiser

    dims = bench_dims(size)
    checkpoint = build_checkpoint_models(dims, device, dtype)
    unet, vae = checkpoint.unet, checkpoint.vae
    resolution, steps = size.resolution, size.memory_steps
    tracker: Optional[PeakTracker] = None
    state = {"sampling": False}

    def first_unet_call(module, args):
        if tracker is not None and not state["sampling"]:
            state["sampling"] = True
            tracker.mark("conditioning")

    def step_done(step, total, *_):
        if tracker is not None and step == total - 1:
            tracker.mark("sampling")

    unet.register_forward_pre_hook(first_unet_call)

    if config == "plain":
        schedule = NoiseSchedule.scaled_linear()
        sampler = get_sampler("DPM++ 2M")
        tokens = torch.randn(1, 256, size.context_dim, generator=torch.Generator().manual_seed(0))
        context = torch.cat([tokens, torch.zeros_like(tokens)]).to(device=device, dtype=dtype)
        denoiser = make_denoiser(lambda x_in, t, context: unet(x_in.to(dtype), t, context).float(), "eps", schedule)

        def model(x, sigma):
            uncond, cond = denoiser(x.repeat(2, 1, 1, 1), sigma.repeat(2), context=context).chunk(2)[::-1]
            return uncond + REFERENCE_GUIDANCE * (cond - uncond)

        def generate():
            sigmas = schedule.get_sigmas(steps, sampler.schedule).to(device)
            latent = resolution // 8
            x = initial_noise((1, 4, latent, latent), 1, float(sigmas[0]), device=device)
            latents = sampler.func(model, x, sigmas, callback=step_done)
            return vae.decode((latents / LATENT_SCALE).to(dtype))
    else:
        clip = bench_clip(size.context_dim, device)
        from bench.original import OriginalColorizer

        colorizer = (OriginalColorizer if config == "original" else Colorizer)(checkpoint, clip, device=device,
                                                                             dtype=dtype)
        options = ColorizeOptions(enabled=True, sketch=synthetic_image(resolution, 0),
                                  reference=synthetic_image(resolution, 100),
                                  reference_guidance=REFERENCE_GUIDANCE, sketch_guidance=SKETCH_GUIDANCE,
                                  injection=config in ("ours", "original"))
        sampling = SamplingOptions(steps=steps, seed=1, width=resolution, height=resolution, batch_size=1)

        def generate():
            return colorizer.colorize(options, sampling, callback=step_done)

    results = []
    with torch.inference_mode():
        for _ in range(2):   # warm-up (one-time allocations of the kernels), then the measured generation
            state["sampling"] = False
            with PeakTracker(device) as tracker:
                generate()
                tracker.mark("decode")
            results.append({"peaks": dict(tracker.peaks), "retained": tracker.retained})
            tracker = None
    measured = results[-1]
    return {"config": config, "method": PeakTracker(device).method,
            "peak_bytes": max(measured["peaks"].values()), "segments": measured["peaks"],
            "first_run_peak_bytes": max(results[0]["peaks"].values()), "retained_bytes": measured["retained"]}


def measure_memory(size: BenchSize, device: torch.device, dtype: torch.dtype, threads: Optional[int] = None,
                   log=print) -> dict:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # large blocks via mmap, returned on free: RSS then follows the live tensors (glibc)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    results = {}
    for config in size.memory_configs:
        command = [sys.executable, "-m", "lib_colorize.bench", "--memory-worker", config,
                   *(["--quick"] if size.name == "quick" else ["--size", size.name]),
                   "--device", str(device), "--dtype", str(dtype).replace("torch.", ""),
                   *(["--threads", str(threads)] if threads else [])]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {config} failed:\n{proc.stderr[-4000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  memory {config}: peak {results[config]['peak_bytes'] / 2 ** 20:.1f} MiB")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Seconds per image (GPU runs)


def seconds_per_image(size: BenchSize, device: torch.device, dtype: torch.dtype, resolutions=(512, 768),
                      steps: int = 20, reps: int = 2) -> list:
    """Wall seconds per image of :meth:`Colorizer.colorize` (batch 1), dual guidance with and without injection."""
    from .options import ColorizeOptions
    from .pipeline import Colorizer, SamplingOptions

    checkpoint = build_checkpoint_models(bench_dims(size), device, dtype)
    colorizer = Colorizer(checkpoint, bench_clip(size.context_dim, device), device=device, dtype=dtype)
    rows = []
    for resolution in resolutions:
        for injection in (False, True):
            options = ColorizeOptions(enabled=True, sketch=synthetic_image(resolution, 0),
                                      reference=synthetic_image(resolution, 100),
                                      reference_guidance=REFERENCE_GUIDANCE, sketch_guidance=SKETCH_GUIDANCE,
                                      injection=injection)
            sampling = SamplingOptions(steps=steps, seed=1, width=resolution, height=resolution)
            times = []
            for rep in range(reps + 1):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                start = time.perf_counter()
                colorizer.colorize(options, sampling)
                _sync(device)
                if rep:
                    times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.append({"resolution": resolution, "injection": injection, "steps": steps,
                         "seconds": _median(times), "peak_vram_bytes": peak})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    commit = "unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "commit": commit,
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n" + "\n".join(lines)   # a blank line first: Markdown tables must not follow a heading line directly


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m lib_colorize.bench",
                                     description="ColorizeDiffusion performance benchmark (issue 6); "
                                                 "ends with one JSON line of the figures.")
    parser.add_argument("--size", choices=("cpu", "full"), default="cpu",
                        help="cpu: reduced-width random U-Net (model_channels 64) at 512x512 (default); "
                             "full: the released dimensions (use a GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda for --size full when available, "
                                                       "else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="model dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per configuration "
                                                              "(default 4 cpu, 10 full, 2 quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on cpu: CPU time of one thread is the figure least "
                             "disturbed by other processes on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (tiny sizes, figures meaningless)")
    parser.add_argument("--seconds-per-image", action="store_true",
                        help="time whole generations at 512 and 768 (default on cuda)")
    parser.add_argument("--endurance", type=int, default=None, metavar="N",
                        help="only run N consecutive varied generations (tiny models) and report memory growth "
                             "and hooks left between them (issue 7)")
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def _resolve(args):
    size = SIZES["quick" if args.quick else args.size]
    device = torch.device(args.device or ("cuda" if size.name == "full" and torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return size, device, dtype, threads


def run(args, log=print) -> dict:
    size, device, dtype, threads = _resolve(args)
    reps = args.reps or size.reps
    machine = machine_description()
    command = " ".join(["python -m lib_colorize.bench"] + _argv_text(args))
    clock = "wall seconds (synchronised)" if device.type == "cuda" else \
        f"process CPU seconds, {torch.get_num_threads()} torch thread(s)"

    log(f"# ColorizeDiffusion benchmark ({size.name})")
    log(f"machine: {machine['cpu']}, {machine['cores']} cores"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"))
    log(f"commit {machine['commit']}; torch {machine['torch']}; python {machine['python']}; command: {command}")

    started = time.perf_counter()
    bench = StepBench(size, device, dtype)
    latent = size.resolution // 8
    log(f"U-Net: released layout, model_channels {bench.dims.model_channels}, context {bench.dims.context_dim}, "
        f"{len(bench.layer_scales)} transformer blocks, {bench.params / 1e6:.1f} M parameters; "
        f"{size.resolution}x{size.resolution} (latent {latent}x{latent}); {device.type} {str(dtype)[6:]}; "
        f"g_r {REFERENCE_GUIDANCE}, g_s {SKETCH_GUIDANCE}, phi {REFERENCE_FIDELITY}; "
        f"{reps} timed repetitions after {size.warmup} warm-up, interleaved; clock: {clock}")
    bench.measure(reps, size.warmup, log=(lambda s: None) if args.quick else log)

    figures = {
        "dual_guidance_ratio": bench.ratio("off_b1", "cfg2"),
        "hook_overhead_ratio": bench.ratio("hooked3", "plain3"),
        "injection_ratio_b1": bench.ratio("ours_b1", "off_b1"),
        "injection_ratio_b4": bench.ratio("ours_b4", "off_b4"),
        "injection_ratio_original_b1": bench.ratio("original_b1", "off_b1"),
        "injection_ratio_original_b4": bench.ratio("original_b4", "off_b4"),
    }
    minima = {
        "dual_guidance_ratio": bench.ratio_of_minima("off_b1", "cfg2"),
        "hook_overhead_ratio": bench.ratio_of_minima("hooked3", "plain3"),
        "injection_ratio_b1": bench.ratio_of_minima("ours_b1", "off_b1"),
        "injection_ratio_b4": bench.ratio_of_minima("ours_b4", "off_b4"),
        "injection_ratio_original_b1": bench.ratio_of_minima("original_b1", "off_b1"),
        "injection_ratio_original_b4": bench.ratio_of_minima("original_b4", "off_b4"),
    }
    sizes_counted = [("bench size", size, size.resolution)]
    if size.name != "full":
        sizes_counted += [("released size", SIZES["full"], 512), ("released size", SIZES["full"], 768)]
    else:
        sizes_counted += [("released size", size, 768)]
    flops = {(label, res): arithmetic(sz, res) for label, sz, res in sizes_counted}
    arith = {key: arithmetic_figures(value) for key, value in flops.items()}

    log("")
    log(f"## (a)-(c) U-Net work per guided step ({clock}; median and min of {reps}; shared machines are noisy)")
    bench_flops = flops[("bench size", size.resolution)]
    rows = []
    for config in bench.configs.values():
        spread = (max(config.times) - min(config.times)) / _median(config.times)
        rows.append([config.name, config.label, config.rows_per_step(), bench_flops[config.name] / 1e9,
                     1000 * _median(config.times), 1000 * min(config.times), f"{100 * spread:.0f}%",
                     1000 * _median(config.wall)])
    log(_table(["config", "what", "U-Net rows/step", "GFLOP/step", "ms median", "ms min", "spread",
                "wall ms median"], rows))

    log("")
    log("## ratios: measured (median of per-repetition ratios; ratio of minima) and arithmetic (FLOP counts)")
    targets = dict(TARGETS, injection_ratio_b1="ours/original <= 0.85", injection_ratio_b4="ours/original <= 0.70")
    arith_headers = [f"FLOPs {label} {res}px" for label, res in arith]
    ratio_rows = [[key, figures[key], minima[key]] + [a[key] for a in arith.values()] + [targets.get(key, "")]
                  for key in JSON_KEYS[:6]]
    for batch, target in ((1, "<= 0.85"), (4, "<= 0.70")):
        ours, orig = f"injection_ratio_b{batch}", f"injection_ratio_original_b{batch}"
        ratio_rows.append([f"ours / original (b{batch})", figures[ours] / figures[orig], minima[ours] / minima[orig]]
                          + [a[ours] / a[orig] for a in arith.values()] + [target])
    ratio_rows.append(["guided_call / unhooked U-Net, 3 rows", bench.ratio("off_b1", "plain3"),
                       bench.ratio_of_minima("off_b1", "plain3")] + [1.0 for _ in arith] + ["(c) incl. the denoiser"])
    log(_table(["ratio", "measured", "of minima"] + arith_headers + ["target"], ratio_rows))
    checks = [["max abs(ours - original), b1", bench.max_abs_diff("ours_b1", "original_b1")],
              ["max abs(ours - original), b4", bench.max_abs_diff("ours_b4", "original_b4")]]
    log(_table(["same result (denoiser outputs of the warm-up step)", "value"], checks))

    log("")
    log("## (d) encoder calls, real Colorizer, tiny random checkpoint + tiny CLIP (batch 2, both scales, injection)")
    with tempfile.TemporaryDirectory(prefix="cd-bench-") as workdir:
        calls = encoder_calls(size, device if device.type == "cuda" else torch.device("cpu"), workdir)
    gen_rows = []
    for index, gen in enumerate(calls["generations"]):
        stats = gen["stats"]
        unet_calls = max(1, stats.get("unet_calls", 0))
        gen_rows.append([f"generation {index + 1}" + (" (same reference)" if index else ""),
                         gen["sketch_encoder_calls"], gen["reference_encoder_calls"],
                         gen["token_cache_encode_calls"], stats.get("unet_rows", 0) / unet_calls,
                         stats.get("write_rows", 0) / unet_calls, gen["live_hooks_after"]])
    log(_table(["generation", "sketch encoder calls", "reference encoder calls", "token-cache encodes",
                "U-Net rows/call", "write rows/call", "hooks left"], gen_rows))
    figures["sketch_encoder_calls"] = int(calls["sketch_encoder_calls"])
    figures["reference_encoder_calls_repeat"] = int(calls["reference_encoder_calls_repeat"])

    if args.no_memory:
        figures["peak_memory_ratio"] = float("nan")
    else:
        log("")
        log(f"## (e) peak memory growth of one generation ({size.memory_steps} steps, "
            f"{size.resolution}x{size.resolution}, batch 1, tiny VAE/sketch encoder/CLIP), one subprocess each")
        memory = measure_memory(size, device, dtype, threads=threads, log=lambda s: None)
        base = memory["plain"]["peak_bytes"]
        base_sampling = memory["plain"]["segments"].get("sampling", float("nan"))
        mem_rows = []
        for config, result in memory.items():
            segments = result["segments"]
            mem_rows.append([config, result["method"], segments.get("conditioning"), segments.get("sampling"),
                             segments.get("decode"), result["peak_bytes"],
                             result["peak_bytes"] / base if base > 0 else float("nan"),
                             segments.get("sampling", float("nan")) / base_sampling if base_sampling > 0
                             else float("nan"),
                             result["first_run_peak_bytes"], result["retained_bytes"]])
        mem_rows = [[v / 2 ** 20 if isinstance(v, (int, float)) and i in (2, 3, 4, 5, 8, 9) else v
                     for i, v in enumerate(row)] for row in mem_rows]
        log(_table(["generation", "measure", "conditioning MiB", "sampling MiB", "decode MiB", "peak MiB",
                    "peak over plain", "sampling over plain", "first run MiB", "retained MiB"], mem_rows))
        worst = "ours" if "ours" in memory else list(memory)[-1]
        figures["peak_memory_ratio"] = memory[worst]["peak_bytes"] / base if base > 0 else float("nan")

    if args.seconds_per_image or device.type == "cuda":
        log("")
        log("## seconds per image (Colorizer, batch 1, dual guidance, random full-size weights, tiny CLIP)")
        spi = seconds_per_image(size, device, dtype, resolutions=(128,) if args.quick else (512, 768),
                                steps=2 if args.quick else 20, reps=1 if args.quick else 2)
        log(_table(["resolution", "injection", "steps", "s/image", "peak VRAM GiB"],
                   [[r["resolution"], r["injection"], r["steps"], r["seconds"],
                     r["peak_vram_bytes"] / 2 ** 30 if r["peak_vram_bytes"] is not None else None] for r in spi]))

    log("")
    log("## figures (the JSON line below)")
    log(_table(["key", "value", "target"], [[key, figures[key], targets.get(key, "")] for key in JSON_KEYS]))
    log(f"(total {time.perf_counter() - started:.0f} s)")
    result = {key: figures[key] for key in JSON_KEYS}
    print(json.dumps(result))
    return result


def _argv_text(args) -> list:
    text = []
    if args.quick:
        text.append("--quick")
    else:
        text += ["--size", args.size]
    for flag in ("device", "dtype", "reps", "threads"):
        value = getattr(args, flag)
        if value is not None:
            text += [f"--{flag}", str(value)]
    for flag in ("seconds_per_image", "no_memory"):
        if getattr(args, flag):
            text.append("--" + flag.replace("_", "-"))
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    if args.memory_worker:
        size, device, dtype, _ = _resolve(args)
        print(json.dumps(memory_worker(args.memory_worker, size, device, dtype)))
        return 0
    if args.endurance:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="cd-endurance-") as workdir:
            print(json.dumps(endurance(args.endurance, workdir, torch.device(args.device or "cpu"))))
        return 0
    threads = torch.get_num_threads()
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)   # in-process callers (tests) keep their setting
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
