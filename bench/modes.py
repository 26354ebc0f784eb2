"""Cost of the enhance modes: one guided step of each mode against the default mode at the same size.

``python -m bench.modes [--size cpu|full|quick] [--reps N] [--device cpu|cuda]``

Every configuration is one guided denoiser step (both guidance scales on: three row groups) through
:func:`lib_colorize.denoiser.guided_call` on the same random U-Net in the released layout, the same latent, hints
and timestep, with the processors of the mode (method-enhance §3):

=============  ===============================================================================================
mode           what the step does beyond the default mode
=============  ===============================================================================================
v1 BG          split cross-attention in all 16 attn2 (two passes), no LoRA
v1.5 BG        + the bg LoRA in the bg pass of all 16 layers
v1.5 FG+BG     + both LoRAs and the doubled ``[E+e_s ; G ; E+e_s ; G]`` context (Q3)
v2 style       the style modulation after each decoder block
v2 BG          split attention, both LoRAs in the 9 decoder layers, the warp of every decoder skip
v2 FG          split attention only
v2 style+BG    both
=============  ===============================================================================================

The encoders (style / bg encoder, ClusterTransformer, mask extractors) run once per generation, not per step,
so they are not in the per-step figures; their one-time FLOPs are the table's last column. For every mode the report
prints the timed ratio over the default step (median of per-repetition ratios, the two terms measured next to
each other, alternating order), the FLOP ratio and both FLOP counts; the target is a timed ratio within 5 % of
the FLOP ratio.

This module is self-contained (it needs only the library) so that the benchmark package can take its
:func:`mode_bench` configurations as rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

REFERENCE_GUIDANCE, SKETCH_GUIDANCE = 5.0, 2.0
TOKENS = 256
TARGET = 0.05


@dataclass(frozen=True)
class ModeSpec:
    """One enhance mode of the bench: the checkpoint version and the options that select it."""

    version: str
    options: dict


MODES: Dict[str, ModeSpec] = {
    "default": ModeSpec("v2", {}),
    "v1 BG": ModeSpec("v1", {"bg_enhance": True}),
    "v1.5 BG": ModeSpec("v1.5", {"bg_enhance": True}),
    "v1.5 FG+BG": ModeSpec("v1.5", {"bg_enhance": True, "fg_enhance": True}),
    "v2 style": ModeSpec("v2", {"style_enhance": True}),
    "v2 BG": ModeSpec("v2", {"bg_enhance": True}),
    "v2 FG": ModeSpec("v2", {"fg_enhance": True}),
    "v2 style+BG": ModeSpec("v2", {"style_enhance": True, "bg_enhance": True}),
}


@dataclass(frozen=True)
class Size:
    name: str
    model_channels: int
    resolution: int
    reps: int


SIZES = {"cpu": Size("cpu", 64, 512, 4), "full": Size("full", 320, 512, 10), "quick": Size("quick", 32, 64, 1)}


def bench_dims(size: Size):
    """The released layout at ``size``'s width: context 1024, 256 ClusterTransformer tokens."""
    from lib_colorize.testing.checkpoints import FULL, tiny_dims

    if size.name == "full":
        return FULL
    mc = size.model_channels
    base = tiny_dims(1024)
    return dataclasses.replace(base, model_channels=mc, sketch_stem=base.sketch_stem[:-1] + (mc,),
                               sketch_hints=(mc, 2 * mc, 4 * mc, 4 * mc), cluster_tokens=TOKENS, thresh_dim=256)


@dataclass
class ModeStep:
    """One measured configuration: ``run`` is one guided step with the mode's processors installed around it."""

    name: str
    run: Callable[[], torch.Tensor]
    processors: object
    flops: Optional[float] = None
    preparation_flops: float = 0.0      # once per generation: encoders, ClusterTransformer, threshold embedding

    def call(self) -> torch.Tensor:
        with self.processors:
            return self.run()


def _models(size: Size, device, dtype, folder: str) -> dict:
    """Per version: the U-Net (the same weights for every version) and the mode's extra modules."""
    from lib_colorize.checkpoint import load_checkpoint, load_enhance_modules
    from lib_colorize.testing.checkpoints import make_checkpoint

    dims = bench_dims(size)
    parts = {"v1": (), "v1.5": ("lora", "thresh_embedder", "cluster_transformer"),
             "v2": ("lora", "warp_modules", "style_modules", "bg_encoder", "style_encoder")}
    out, unet = {}, None
    for version in ("v1", "v1.5", "v2"):
        path = make_checkpoint(f"{folder}/{version}.safetensors", version=version, size=dims, seed=0)
        if unet is None:
            unet = load_checkpoint(path, components=("unet",), dtype=dtype, device=device).unet
        modules = load_enhance_modules(path, parts[version], dtype=dtype, device=device) if parts[version] else None
        out[version] = modules
    out["unet"] = unet
    return out


def mode_bench(size: Size, device: torch.device, dtype: torch.dtype, folder: str, modes: Sequence[str] = tuple(MODES),
               seed: int = 0) -> Dict[str, ModeStep]:
    """The configurations of ``modes``: one guided step each, on one U-Net and one set of inputs."""
    from lib_colorize import enhance
    from lib_colorize.cache import ContentCache
    from lib_colorize.conditioning import build_plan
    from lib_colorize.denoiser import guided_call
    from lib_colorize.options import ColorizeOptions
    from lib_colorize.processors import HINT_BLOCKS, for_generation

    models = _models(size, device, dtype, folder)
    unet = models["unet"]
    latent = size.resolution // 8
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    shapes = {}
    handles = [unet.input_blocks[i].register_forward_hook(lambda m, a, o, i=i: shapes.__setitem__(i, o.shape[1:]))
               for i in HINT_BLOCKS]
    with torch.no_grad():
        unet(randn(1, 4, latent, latent), torch.tensor([500.0], device=device), randn(1, 4, 1024))
    for handle in handles:
        handle.remove()
    hints = [randn(1, *shapes[i], scale=0.1) for i in HINT_BLOCKS]
    blank = [randn(1, *shapes[i], scale=0.1) for i in HINT_BLOCKS]
    E = randn(1, TOKENS, 1024)
    x = randn(1, 4, latent, latent)
    t = torch.tensor([500.0], device=device)
    mask = torch.zeros(1, 1, latent, latent)
    mask[..., : latent // 2] = 1.0          # half character, half background
    reference = torch.rand(1, 3, size.resolution, size.resolution, generator=gen) * 2 - 1
    inputs = enhance.MaskInputs(latent_mask=mask, reference=reference, reference_mask=mask.repeat_interleave(8, -1)
                                .repeat_interleave(8, -2))

    def encode_local(image):
        return E.float()

    class Posterior:
        def __init__(self, image):
            pooled = torch.nn.functional.avg_pool2d(image.float(), 8)
            self.mean = pooled.mean(1, keepdim=True).expand(-1, 4, -1, -1).to(device)
            self.std = torch.full_like(self.mean, 0.01)

    steps = {}
    for name in modes:
        spec = MODES[name]
        options = ColorizeOptions(enabled=True, reference_guidance=REFERENCE_GUIDANCE,
                                  sketch_guidance=SKETCH_GUIDANCE, **spec.options)
        enhance_plan, context, preparation = None, E, 0.0
        if options.enhanced:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                enhance_plan, context = enhance.prepare_enhance(
                    spec.version, options, models[spec.version], E, inputs, encode_local=encode_local,
                    vae_encode=Posterior, seeds=[seed], size=(size.resolution,) * 2, cache=ContentCache(),
                    device=device, dtype=dtype)
            preparation = counter.get_total_flops()
        plan = build_plan(options, sketch_hints=hints, blank_hints=blank, tokens=context, enhance=enhance_plan)
        processors = for_generation(unet, enhance=enhance_plan)

        def run(plan=plan, processors=processors):
            with torch.no_grad():
                return guided_call(plan, processors, lambda xi, si, ci: unet(xi, si, ci), x, t, t)

        steps[name] = ModeStep(name, run, processors, preparation_flops=preparation)
    return steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(steps: Dict[str, ModeStep]) -> None:
    """FLOPs of one call of every step (``torch.utils.flop_counter``: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    for step in steps.values():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            step.call()
        step.flops = counter.get_total_flops()


def measure(steps: Dict[str, ModeStep], reps: int, device: torch.device, warmup: int = 1) -> Dict[str, float]:
    """Per mode, the median over repetitions of ``time(mode) / time(default)``, the two measured next to each
    other (order alternating between repetitions)."""
    for step in steps.values():
        for _ in range(warmup):
            step.call()
    ratios: Dict[str, list] = {name: [] for name in steps if name != "default"}
    default = steps["default"]
    for rep in range(reps):
        for name in ratios:
            pair = (default, steps[name]) if rep % 2 == 0 else (steps[name], default)
            seconds = {}
            for step in pair:
                _synchronize(device)
                start = time.perf_counter()
                step.call()
                _synchronize(device)
                seconds[step.name] = time.perf_counter() - start
            ratios[name].append(seconds[name] / seconds["default"])
    return {name: statistics.median(values) for name, values in ratios.items()}


def report(steps: Dict[str, ModeStep], ratios: Dict[str, float]) -> str:
    default = steps["default"].flops
    lines = ["| mode | timed ratio over default | FLOP ratio | GFLOP per step (mode / default) | within 5 % "
             "| GFLOP once per generation |", "|---|---|---|---|---|---|"]
    for name, ratio in ratios.items():
        flop_ratio = steps[name].flops / default
        within = abs(ratio / flop_ratio - 1.0) <= TARGET
        lines.append(f"| {name} | {ratio:.3f} | {flop_ratio:.3f} | {steps[name].flops / 1e9:.2f} / "
                     f"{default / 1e9:.2f} | {'yes' if within else 'no'} | {steps[name].preparation_flops / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        steps = mode_bench(size, device, dtype, folder)
        count_flops(steps)
        ratios = measure(steps, args.reps or size.reps, device)
    print(f"enhance modes, one guided step (3 row groups) at {size.resolution}x{size.resolution}, "
          f"model_channels {size.model_channels}, {device} {args.dtype}, {args.reps or size.reps} repetitions")
    print(report(steps, ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
