"""The U-Net work of one guided step, per configuration: figures (a)-(c) of the benchmark.

Every configuration is one guided denoiser step (or the bare U-Net call it is compared with) on the same U-Net,
inputs and noise, so that a ratio of two configurations measures only what differs between them:

* ``plain3`` / ``hooked3``: the U-Net at batch 3 without and with our processors (sketch hints + non-unit layer
  scales): the processors' overhead;
* ``cfg2``: plain two-row CFG, the baseline of dual guidance;
* ``off_b{1,4}`` / ``ours_b{1,4}`` / ``original_b{1,4}``: dual guidance through the denoiser with injection off, on
  (the library's :func:`~lib_colorize.denoiser.guided_call` and processors: the reference pass runs the distinct
  rows only and stops after the last bank write; the reference-dropped rows' φ-blend comes from two merged
  ``N``-key attentions) and on the original's way (:mod:`bench.original`: the full-batch reference pass through
  the whole U-Net, a separate plain self-attention next to the injected one over ``2N`` keys).

Timed ratios are medians of per-repetition ratios (the two terms of each ratio run next to each other); the ratio
of the minima is the least disturbed measurement of each (noise only adds).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .clock import median, step_clock, synchronize
from .models import build_unet
from .sizes import REFERENCE_FIDELITY, REFERENCE_GUIDANCE, SKETCH_GUIDANCE, BenchSize, checkpoint_dims

#: each timed figure as (numerator, denominator) configuration
RATIO_TERMS = {
    "dual_guidance_ratio": ("off_b1", "cfg2"),
    "hook_overhead_ratio": ("hooked3", "plain3"),
    "injection_ratio_b1": ("ours_b1", "off_b1"),
    "injection_ratio_b4": ("ours_b4", "off_b4"),
    "injection_ratio_original_b1": ("original_b1", "off_b1"),
    "injection_ratio_original_b4": ("original_b4", "off_b4"),
}

BATCHES = (1, 4)
INJECTION_NOISE_SEED = 1234   # the same reference-pass ε in every configuration and repetition
LAYER_SCALES = tuple(0.8 + 0.025 * i for i in range(16))   # non-unit on all 16 transformer blocks


@dataclass
class StepConfig:
    """One measured configuration: ``run`` is one step; its processors are installed around it, outside the
    timer."""

    name: str
    label: str
    run: Callable[[], torch.Tensor]
    processors: object = None       # ProcessorSet
    plan: object = None             # GenerationPlan (its stats count the rows)
    rows: Optional[int] = None      # U-Net rows per step of the configurations without a plan
    calls: int = 0
    times: List[float] = dataclasses.field(default_factory=list)   # clock seconds, one per repetition
    wall: List[float] = dataclasses.field(default_factory=list)
    output: Optional[torch.Tensor] = None

    def call(self) -> torch.Tensor:
        if self.processors is None:
            out = self.run()
        else:
            with self.processors:
                out = self.run()
        self.calls += 1
        return out

    def rows_per_step(self) -> Optional[float]:
        """U-Net rows evaluated per step, the reference pass's included."""
        if self.plan is None or not self.calls:
            return self.rows
        return (self.plan.stats["unet_rows"] + self.plan.stats["write_rows"]) / self.calls


# -- the generation plan: the one place the bench builds an InjectionPlan -------------------------------------------

def generation_plan(inputs: StepInputs, injection: bool):
    """The plan of a guided step with both scales on, with attention injection when ``injection``."""
    from lib_colorize.denoiser import GenerationPlan, InjectionPlan

    inj = None
    if injection:
        # every image gets the same latent and ε stream, so ours and the original's shared draw agree
        batch = max(inputs.x)
        inj = InjectionPlan(reference_latents=inputs.reference_latent.expand(batch, -1, -1, -1), hints=None,
                            noise_generators=[torch.Generator() for _ in range(batch)],
                            reference_fidelity=REFERENCE_FIDELITY, start=0.0)
    return GenerationPlan(mode=inputs.mode, reference_guidance=REFERENCE_GUIDANCE, sketch_guidance=SKETCH_GUIDANCE,
                          reference_tokens=inputs.tokens, sketch_hints=inputs.sketch_hints,
                          blank_hints=inputs.blank_hints, injection=inj)


def reseed_injection_noise(plan) -> None:
    """Give the reference pass the same ε in every configuration."""
    if plan.injection is not None:
        for generator in plan.injection.noise_generators:
            generator.manual_seed(INJECTION_NOISE_SEED)


# -- inputs -------------------------------------------------------------------------------------------------------

@dataclass
class StepInputs:
    """Random inputs of a guided step, shaped for ``unet`` at ``latent`` x ``latent``."""

    mode: object
    tokens: torch.Tensor
    sketch_hints: list
    blank_hints: list
    reference_latent: torch.Tensor
    x: Dict[int, torch.Tensor]        # by batch size
    t: torch.Tensor
    sigma: torch.Tensor


def hint_shapes(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list:
    """Shapes of the five hint levels: the outputs of ``input_blocks[0, 3, 6, 9, 11]`` (method §3)."""
    from lib_colorize.processors import HINT_BLOCKS

    shapes = {}
    handles = [unet.input_blocks[i].register_forward_hook(
        lambda m, a, out, i=i: shapes.__setitem__(i, tuple(out.shape[1:]))) for i in HINT_BLOCKS]
    try:
        with torch.inference_mode():
            unet(x, t, context)
    finally:
        for handle in handles:
            handle.remove()
    return [shapes[i] for i in HINT_BLOCKS]


def step_inputs(unet, latent: int, context_dim: int, device, dtype, seed: int) -> StepInputs:
    """Every configuration's inputs, drawn from one generator seeded with ``seed + 1``."""
    from lib_colorize.guidance import guidance_mode

    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    t = torch.tensor([500.0], device=device)
    shapes = hint_shapes(unet, randn(1, 4, latent, latent), t, randn(1, 4, context_dim))
    return StepInputs(mode=guidance_mode(REFERENCE_GUIDANCE, SKETCH_GUIDANCE),
                      sketch_hints=[randn(1, *s, scale=0.1) for s in shapes],
                      blank_hints=[randn(1, *s, scale=0.1) for s in shapes],
                      tokens=randn(1, 256, context_dim), reference_latent=randn(1, 4, latent, latent),
                      x={b: randn(b, 4, latent, latent) for b in BATCHES},
                      t=t, sigma=torch.tensor([1.0], device=device))


# -- the bench ----------------------------------------------------------------------------------------------------

class StepBench:
    """The configurations of (a)-(c) on one U-Net; :meth:`measure` times them interleaved."""

    def __init__(self, size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0, unet=None,
                 resolution: Optional[int] = None):
        self.size, self.device, self.dtype = size, device, dtype
        self.dims = checkpoint_dims(size)
        self.unet = unet if unet is not None else build_unet(self.dims, device, dtype, seed)
        self.params = sum(p.numel() for p in self.unet.parameters())
        self.layer_scales = list(LAYER_SCALES)
        self.inputs = step_inputs(self.unet, (resolution or size.resolution) // 8, size.context_dim, device, dtype,
                                  seed)
        self.configs: Dict[str, StepConfig] = {}
        # order: the two terms of every ratio are measured next to each other
        self._add_unet_configs()
        for batch in BATCHES:
            self._add_guided_configs(batch)

    def _add(self, name, label, run, processors=None, plan=None, rows=None) -> None:
        self.configs[name] = StepConfig(name, label, run, processors=processors, plan=plan, rows=rows)

    def _add_unet_configs(self) -> None:
        from lib_colorize.denoiser import row_contexts, row_hints
        from lib_colorize.guidance import row_roles
        from lib_colorize.processors import UNetCall, for_generation

        unet, inputs = self.unet, self.inputs
        roles = row_roles(inputs.mode)
        plan = generation_plan(inputs, injection=False)
        x2, ctx2 = inputs.x[1].repeat(2, 1, 1, 1), torch.cat([inputs.tokens, torch.zeros_like(inputs.tokens)])
        x3, ctx3, hints3 = inputs.x[1].repeat(3, 1, 1, 1), row_contexts(plan, roles, 1, True), row_hints(plan, roles, 1)
        processors = for_generation(unet, layer_scales=self.layer_scales)

        def plain_cfg():
            uncond, cond = unet(x2, inputs.t, ctx2).chunk(2)[::-1]
            return uncond + REFERENCE_GUIDANCE * (cond - uncond)

        def hooked3():
            with processors.call(UNetCall(sketch_hints=hints3)):
                return unet(x3, inputs.t, ctx3)

        self._add("plain3", "unhooked U-Net, 3 rows", lambda: unet(x3, inputs.t, ctx3), rows=3)
        self._add("hooked3", "hooked U-Net (hints + layer scales), 3 rows", hooked3, processors=processors, rows=3)
        self._add("cfg2", "plain two-row CFG, unhooked U-Net (b1)", plain_cfg, rows=2)

    def _add_guided_configs(self, batch: int) -> None:
        from bench.original import original_guided_call, original_processors
        from lib_colorize.denoiser import guided_call
        from lib_colorize.processors import for_generation

        for kind, label, processors_for, call in (
                ("off", "injection off", for_generation, guided_call),
                ("ours", "injection on, ours (distinct rows)", for_generation, guided_call),
                ("original", "injection on, original (full batch)", original_processors, original_guided_call)):
            plan = generation_plan(self.inputs, injection=kind != "off")
            processors = processors_for(self.unet, layer_scales=self.layer_scales, injection=kind != "off")
            self._add(f"{kind}_b{batch}", f"dual guidance, {label} (b{batch})",
                      self._guided_step(call, plan, processors, batch), processors=processors, plan=plan)

    def _guided_step(self, call, plan, processors, batch: int) -> Callable[[], torch.Tensor]:
        inputs, unet = self.inputs, self.unet
        x = inputs.x[batch]

        def inner_model(x_in, sigma_in, context):
            return unet(x_in, inputs.t, context)

        def noised_reference(latent, sigma, noise):
            return latent + sigma.reshape(-1, 1, 1, 1).to(latent) * noise

        def run():
            reseed_injection_noise(plan)
            return call(plan, processors, inner_model, x, inputs.sigma, 500.0, noised_reference=noised_reference)
        return run

    # -- measurement -----------------------------------------------------------------------------------------------
    def measure(self, reps: int, warmup: int, log=print) -> None:
        """Warm-up (its outputs kept for :meth:`max_abs_diff`), then ``reps`` repetitions of every configuration in
        alternating order, against drift."""
        names = list(self.configs)
        clock = step_clock(self.device)
        with torch.inference_mode():
            for _ in range(max(1, warmup)):
                for name in names:
                    self.configs[name].output = self.configs[name].call()
            for rep in range(reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    config = self.configs[name]
                    synchronize(self.device)
                    wall, start = time.perf_counter(), clock()
                    config.call()
                    synchronize(self.device)
                    config.times.append(clock() - start)
                    config.wall.append(time.perf_counter() - wall)
                log(f"  repetition {rep + 1}/{reps} done")

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over repetitions of the per-repetition ratio (both terms measured in the same repetition)."""
        num, den = self.configs[numerator].times, self.configs[denominator].times
        return median([a / b for a, b in zip(num, den)])

    def ratio_of_minima(self, numerator: str, denominator: str) -> float:
        """min(numerator) / min(denominator): the least disturbed measurement of each (noise only adds)."""
        return min(self.configs[numerator].times) / min(self.configs[denominator].times)

    def figures(self, of_minima: bool = False) -> dict:
        """The timed figures of :data:`RATIO_TERMS`."""
        ratio = self.ratio_of_minima if of_minima else self.ratio
        return {key: ratio(num, den) for key, (num, den) in RATIO_TERMS.items()}

    def max_abs_diff(self, a: str, b: str) -> Optional[float]:
        """Largest difference between the warm-up outputs of two configurations (ours vs the original's)."""
        out_a, out_b = self.configs[a].output, self.configs[b].output
        if out_a is None or out_b is None:
            return None
        return float((out_a.float() - out_b.float()).abs().max())
