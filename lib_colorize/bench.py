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
    a plain two-row-CFG generation with the same unhooked U-Net, sampler, steps and VAE decode. One subprocess per
    configuration: on CPU the growth of the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; glibc is
    told to give large blocks back with ``MALLOC_MMAP_THRESHOLD_``), on CUDA ``torch.cuda.max_memory_allocated``.

Sizes: ``--size cpu`` (default) is the released U-Net layout at reduced width (model_channels 64, 16 transformer
blocks, context 1024) at 512x512 (latent 64x64); ``--size full`` the released dimensions (use a GPU);
``--quick`` a CI-sized smoke run (tiny U-Net, 128x128) whose figures only prove that the bench runs.

A narrow U-Net spends a larger share of its time in self-attention than the released one (attention grows with
tokens² x width, convolutions with tokens x width²), so the injection ratios measured at ``--size cpu`` are
upper bounds of the full-size ones.

``--early-stop`` also times a prototype (not in the library) where the reference (write) pass stops right after
the last transformer block's ``attn1`` has filled the bank: a forward pre-hook raises :class:`WritePassDone`,
which the inner model catches. The JSON line always reports the library as it is.

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
    "cpu": BenchSize("cpu", 64, 1024, 512, 5, 1, 2, ("plain", "dual", "ours", "original"), 256, 2),
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


class WritePassDone(Exception):
    """Raised by the early-stop prototype once the last transformer block has written its bank entry."""


def install_early_stop(hooks) -> object:
    """Prototype: stop the write pass after the last ``attn1`` bank write (handle to remove).

    Registered after :meth:`ColorizeHooks.install`, so it runs after the bank pre-hook of the same ``attn1``.
    """
    from .hooks import WRITE

    def stop(module, args, kwargs):
        if hooks.injection_mode == WRITE:
            raise WritePassDone()
        return None

    return hooks.blocks[-1].attn1.register_forward_pre_hook(stop, with_kwargs=True)


@dataclass
class StepConfig:
    name: str
    label: str
    run: Callable[[], torch.Tensor]
    hooks: object = None            # ColorizeHooks installed around each call (outside the timer)
    early_stop: bool = False
    plan: object = None             # GenerationPlan (its stats count rows)
    calls: int = 0
    times: List[float] = dataclasses.field(default_factory=list)
    output: Optional[torch.Tensor] = None

    def call(self) -> torch.Tensor:
        handle = None
        if self.hooks is not None:
            self.hooks.install()
            if self.early_stop:
                handle = install_early_stop(self.hooks)
        try:
            out = self.run()
        finally:
            if handle is not None:
                handle.remove()
            if self.hooks is not None:
                self.hooks.remove()
        self.calls += 1
        return out

    def rows_per_step(self) -> Optional[float]:
        if self.plan is None or not self.calls:
            return None
        return (self.plan.stats["unet_rows"] + self.plan.stats["write_rows"]) / self.calls


class StepBench:
    """(a)-(c): the U-Net work of one guided step, through ``guided_call`` with an inner model calling the U-Net."""

    def __init__(self, size: BenchSize, device: torch.device, dtype: torch.dtype, early_stop: bool = False,
                 seed: int = 0):
        from .guidance import guidance_mode, row_roles
        from .hooks import HINT_BLOCKS

        self.size, self.device, self.dtype = size, device, dtype
        self.dims = bench_dims(size)
        self.unet = build_unet(self.dims, device, dtype, seed)
        self.params = sum(p.numel() for p in self.unet.parameters())
        latent = size.resolution // 8
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
        self._build_configs(early_stop)

    # -- configurations ----------------------------------------------------------------------------------------
    def _plan(self, injection: Optional[str]):
        from .denoiser import GenerationPlan, InjectionPlan

        inj = None
        if injection is not None:
            inj = InjectionPlan(reference_latent=self.reference_latent, hints=None,
                                reference_fidelity=REFERENCE_FIDELITY, start=0.0,
                                noise_generator=torch.Generator(), full_batch=injection == "original")
        return GenerationPlan(mode=self.mode, reference_guidance=REFERENCE_GUIDANCE,
                              sketch_guidance=SKETCH_GUIDANCE, reference_tokens=self.tokens,
                              sketch_hints=self.sketch_hints, blank_hints=self.blank_hints, injection=inj)

    def _inner_model(self, x_in, sigma_in, context):
        try:
            return self.unet(x_in, self.t, context)
        except WritePassDone:
            return None   # early-stop prototype: the write pass's output is discarded anyway

    def _noised_reference(self, latent, sigma, noise):
        return latent + sigma.reshape(-1, 1, 1, 1).to(latent) * noise

    def _guided(self, plan, hooks, batch: int) -> Callable[[], torch.Tensor]:
        from .denoiser import guided_call

        x = self.x[batch]

        def run():
            if plan.injection is not None:
                plan.injection.noise_generator.manual_seed(1234)   # same ε in every configuration
            return guided_call(plan, hooks, self._inner_model, x, self.sigma, self.t,
                               noised_reference=self._noised_reference)
        return run

    def _build_configs(self, early_stop: bool) -> None:
        from .denoiser import row_contexts, row_hints
        from .hooks import ColorizeHooks

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

        hooked = ColorizeHooks(unet, layer_scales=self.layer_scales)

        def hooked3():
            hooked.set_call(hints3)
            try:
                return unet(x3, self.t, ctx3)
            finally:
                hooked.clear_call()

        add = self._add
        add("cfg2", "plain two-row CFG, unhooked U-Net (b1)", plain_cfg)
        add("plain3", "unhooked U-Net, 3 rows", plain3)
        add("hooked3", "hooked U-Net (hints + layer scales), 3 rows", hooked3, hooks=hooked)
        for batch in (1, 4):
            for kind, label in ((None, "injection off"), ("ours", "injection on, ours (distinct rows)"),
                                ("original", "injection on, original (full batch)")):
                plan = self._plan(kind)
                hooks = ColorizeHooks(unet, layer_scales=self.layer_scales, injection=kind is not None)
                name = f"{kind or 'off'}_b{batch}"
                add(name, f"dual guidance, {label} (b{batch})", self._guided(plan, hooks, batch),
                    hooks=hooks, plan=plan)
            if early_stop:
                plan = self._plan("ours")
                hooks = ColorizeHooks(unet, layer_scales=self.layer_scales, injection=True)
                add(f"ours_es_b{batch}", f"dual guidance, injection on, ours + early stop (b{batch}, prototype)",
                    self._guided(plan, hooks, batch), hooks=hooks, plan=plan, early_stop=True)

    def _add(self, name, label, run, hooks=None, plan=None, early_stop=False):
        self.configs[name] = StepConfig(name, label, run, hooks=hooks, plan=plan, early_stop=early_stop)

    # -- measurement -------------------------------------------------------------------------------------------
    def measure(self, reps: int, warmup: int, log=print) -> None:
        names = list(self.configs)
        with torch.inference_mode():
            for _ in range(max(1, warmup)):
                for name in names:
                    self.configs[name].output = self.configs[name].call()
            for rep in range(reps):
                order = names if rep % 2 == 0 else names[::-1]   # alternate the order against drift
                for name in order:
                    config = self.configs[name]
                    _sync(self.device)
                    start = time.perf_counter()
                    config.call()
                    _sync(self.device)
                    config.times.append(time.perf_counter() - start)
                log(f"  repetition {rep + 1}/{reps} done")

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over repetitions of the per-repetition ratio (both measured in the same repetition)."""
        num, den = self.configs[numerator].times, self.configs[denominator].times
        return _median([a / b for a, b in zip(num, den)])

    def max_abs_diff(self, a: str, b: str) -> Optional[float]:
        out_a, out_b = self.configs[a].output, self.configs[b].output
        if out_a is None or out_b is None:
            return None
        return float((out_a.float() - out_b.float()).abs().max())


# ---------------------------------------------------------------------------------------------------------------------
# (d) encoder calls through the real Colorizer


def encoder_calls(size: BenchSize, device: torch.device, workdir: str) -> dict:
    """Colorize twice with one reference (different sketches and seeds) and count the encoders' forward calls."""
    from .hooks import live_hook_count
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


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(config: str, size: BenchSize, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory growth of one generation of ``config`` (run in a fresh process)."""
    from .models import LATENT_SCALE
    from .options import ColorizeOptions
    from .pipeline import Colorizer, SamplingOptions
    from .samplers import get_sampler, initial_noise
    from .schedule import NoiseSchedule, make_denoiser

    dims = bench_dims(size)
    checkpoint = build_checkpoint_models(dims, device, dtype)
    unet, vae = checkpoint.unet, checkpoint.vae
    resolution, steps = size.resolution, size.memory_steps

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
            latents = sampler.func(model, x, sigmas)
            return vae.decode((latents / LATENT_SCALE).to(dtype))
    else:
        clip = bench_clip(size.context_dim, device)
        colorizer = Colorizer(checkpoint, clip, device=device, dtype=dtype)
        options = ColorizeOptions(enabled=True, sketch=synthetic_image(resolution, 0),
                                  reference=synthetic_image(resolution, 100),
                                  reference_guidance=REFERENCE_GUIDANCE, sketch_guidance=SKETCH_GUIDANCE,
                                  injection=config in ("ours", "original"))
        sampling = SamplingOptions(steps=steps, seed=1, width=resolution, height=resolution, batch_size=1)

        def generate():
            return colorizer.colorize(options, sampling, injection_full_batch=config == "original")

    runs = []
    with torch.inference_mode():
        for _ in range(2):   # the first run warms up; the second is measured (its peak must not exceed the first)
            _release_memory()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                generate()
                torch.cuda.synchronize(device)
                runs.append({"peak": torch.cuda.max_memory_allocated(device) - base,
                             "retained": torch.cuda.memory_allocated(device) - base, "method": "cuda"})
            else:
                method = "VmHWM" if _reset_peak_rss() else "ru_maxrss"
                base = _vm_kib("VmRSS") or 0
                generate()
                if method == "VmHWM":
                    peak = _vm_kib("VmHWM") or 0
                else:
                    import resource
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                _release_memory()
                runs.append({"peak": (peak - base) * 1024, "retained": ((_vm_kib("VmRSS") or 0) - base) * 1024,
                             "method": method})
    return {"config": config, "peak_bytes": runs[-1]["peak"], "first_run_peak_bytes": runs[0]["peak"],
            "retained_bytes": runs[-1]["retained"], "method": runs[-1]["method"]}


def measure_memory(size: BenchSize, device: torch.device, dtype: torch.dtype, log=print) -> dict:
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
                   "--device", str(device), "--dtype", str(dtype).replace("torch.", "")]
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
    return "\n".join(lines)


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
                        help="U-Net dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per configuration")
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (tiny sizes, figures meaningless)")
    parser.add_argument("--early-stop", action="store_true",
                        help="also time the early-stop prototype of the write pass (table only)")
    parser.add_argument("--seconds-per-image", action="store_true",
                        help="time whole generations at 512 and 768 (default on cuda)")
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def run(args, log=print) -> dict:
    size = SIZES["quick" if args.quick else args.size]
    device = torch.device(args.device or ("cuda" if size.name == "full" and torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    reps = args.reps or size.reps
    machine = machine_description()
    command = " ".join(["python -m lib_colorize.bench"] + _argv_text(args))

    log(f"# ColorizeDiffusion benchmark ({size.name})")
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"))
    log(f"commit {machine['commit']}; torch {machine['torch']}; python {machine['python']}; command: {command}")

    started = time.perf_counter()
    bench = StepBench(size, device, dtype, early_stop=args.early_stop)
    latent = size.resolution // 8
    log(f"U-Net: released layout, model_channels {size.model_channels}, context {size.context_dim}, "
        f"{len(bench.layer_scales)} transformer blocks, {bench.params / 1e6:.1f} M parameters; "
        f"{size.resolution}x{size.resolution} (latent {latent}x{latent}); {device.type} {str(dtype)[6:]}; "
        f"g_r {REFERENCE_GUIDANCE}, g_s {SKETCH_GUIDANCE}, phi {REFERENCE_FIDELITY}; "
        f"{reps} timed repetitions after {size.warmup} warm-up, interleaved")
    bench.measure(reps, size.warmup, log=lambda s: log(s) if not args.quick else None)

    figures = {
        "dual_guidance_ratio": bench.ratio("off_b1", "cfg2"),
        "hook_overhead_ratio": bench.ratio("hooked3", "plain3"),
        "injection_ratio_b1": bench.ratio("ours_b1", "off_b1"),
        "injection_ratio_b4": bench.ratio("ours_b4", "off_b4"),
        "injection_ratio_original_b1": bench.ratio("original_b1", "off_b1"),
        "injection_ratio_original_b4": bench.ratio("original_b4", "off_b4"),
    }

    log("")
    log(f"## (a)-(c) U-Net work per guided step (median of {reps}; shared machines are noisy)")
    rows = []
    for config in bench.configs.values():
        per_step = config.rows_per_step()
        rows.append([config.name, config.label, per_step if per_step is not None else "-",
                     1000 * _median(config.times), 1000 * min(config.times)])
    log(_table(["config", "what", "U-Net rows/step", "ms/step median", "ms/step min"], rows))

    extra = [
        ["guided_call overhead at batch 3", bench.ratio("off_b1", "plain3"), "dual guidance b1 / unhooked 3 rows"],
        ["ours / original (b1)", figures["injection_ratio_b1"] / figures["injection_ratio_original_b1"], "<= 0.85"],
        ["ours / original (b4)", figures["injection_ratio_b4"] / figures["injection_ratio_original_b4"], "<= 0.70"],
        ["max |ours - original| (b1)", bench.max_abs_diff("ours_b1", "original_b1"), "float tolerance"],
        ["max |ours - original| (b4)", bench.max_abs_diff("ours_b4", "original_b4"), "float tolerance"],
    ]
    if args.early_stop:
        for batch in (1, 4):
            ratio = bench.ratio(f"ours_es_b{batch}", f"off_b{batch}")
            extra += [
                [f"early stop: injection ratio (b{batch})", ratio, "prototype"],
                [f"early stop: ours / original (b{batch})",
                 ratio / figures[f"injection_ratio_original_b{batch}"], "prototype"],
                [f"early stop: write pass saved (b{batch})",
                 bench.ratio(f"ours_b{batch}", f"ours_es_b{batch}"), "ours / ours + early stop"],
                [f"max |early stop - ours| (b{batch})", bench.max_abs_diff(f"ours_es_b{batch}", f"ours_b{batch}"),
                 "0"],
            ]

    log("")
    log("## (d) encoder calls, real Colorizer, tiny random checkpoint + tiny CLIP (batch 2, injection on)")
    with tempfile.TemporaryDirectory(prefix="cd-bench-") as workdir:
        calls = encoder_calls(size, torch.device("cpu") if device.type != "cuda" else device, workdir)
    gen_rows = []
    for index, gen in enumerate(calls["generations"]):
        stats = gen["stats"]
        rows_per_call = stats.get("unet_rows", 0) / max(1, stats.get("unet_calls", 0))
        gen_rows.append([f"generation {index + 1}" + (" (same reference)" if index else ""),
                         gen["sketch_encoder_calls"], gen["reference_encoder_calls"],
                         gen["token_cache_encode_calls"], rows_per_call,
                         stats.get("write_rows", 0) / max(1, stats.get("unet_calls", 0)), gen["live_hooks_after"]])
    log(_table(["generation", "sketch encoder calls", "reference encoder calls", "token-cache encodes",
                "U-Net rows/call", "write rows/call", "hooks left"], gen_rows))
    figures["sketch_encoder_calls"] = int(calls["sketch_encoder_calls"])
    figures["reference_encoder_calls_repeat"] = int(calls["reference_encoder_calls_repeat"])

    memory = None
    if args.no_memory:
        figures["peak_memory_ratio"] = float("nan")
    else:
        log("")
        log(f"## (e) peak memory of one generation ({size.memory_steps} steps, {size.resolution}x{size.resolution},"
            f" batch 1), one subprocess each")
        memory = measure_memory(size, device, dtype, log=lambda s: None)
        base = memory["plain"]["peak_bytes"]
        mem_rows = []
        for config, result in memory.items():
            mem_rows.append([config, result["method"], result["peak_bytes"] / 2 ** 20,
                             result["first_run_peak_bytes"] / 2 ** 20, result["retained_bytes"] / 2 ** 20,
                             result["peak_bytes"] / base if base > 0 else float("nan")])
        log(_table(["generation", "measure", "peak growth MiB", "first run MiB", "retained MiB", "over plain"],
                   mem_rows))
        worst = "ours" if "ours" in memory else list(memory)[-1]
        figures["peak_memory_ratio"] = memory[worst]["peak_bytes"] / base if base > 0 else float("nan")

    spi = None
    if args.seconds_per_image or device.type == "cuda":
        log("")
        log("## seconds per image (Colorizer, batch 1, 20 steps, dual guidance)")
        spi = seconds_per_image(size, device, dtype, resolutions=(128,) if args.quick else (512, 768),
                                steps=2 if args.quick else 20, reps=1 if args.quick else 2)
        log(_table(["resolution", "injection", "s/image", "peak VRAM GiB"],
                   [[r["resolution"], r["injection"], r["seconds"],
                     r["peak_vram_bytes"] / 2 ** 30 if r["peak_vram_bytes"] is not None else None] for r in spi]))

    log("")
    log("## figures")
    figure_rows = [[key, figures[key], TARGETS.get(key, "")] for key in JSON_KEYS]
    figure_rows[2][2] = figure_rows[3][2] = "ours / original: <= 0.85 (b1), <= 0.70 (b4)"
    log(_table(["key", "value", "target"], figure_rows + extra))
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
    for flag in ("device", "dtype", "reps"):
        value = getattr(args, flag)
        if value is not None:
            text += [f"--{flag}", str(value)]
    for flag in ("early_stop", "seconds_per_image", "no_memory"):
        if getattr(args, flag):
            text.append("--" + flag.replace("_", "-"))
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    if args.memory_worker:
        size = SIZES["quick" if args.quick else args.size]
        device = torch.device(args.device or "cpu")
        dtype = getattr(torch, args.dtype or "float32")
        print(json.dumps(memory_worker(args.memory_worker, size, device, dtype)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
