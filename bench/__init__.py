"""Performance benchmark of ColorizeDiffusion: ``python -m bench`` (from the repository root).

Every figure is measured side by side in one run (configurations interleaved across repetitions, alternating order,
medians), so that the ratios, not the absolute times, carry the result:

(a) ``dual_guidance_ratio``: U-Net work per guided step with both scales on (3 rows, through
    :func:`lib_colorize.denoiser.guided_call` on our processors) over plain two-row CFG on the same U-Net without
    processors. Floor 1.5 (3 rows over 2); target <= 1.55.
(b) ``injection_ratio_b{1,4}``: injection on over injection off per guided step, both scales on, batch 1 and 4,
    with the library's reference pass over the distinct rows only; ``injection_ratio_original_b{1,4}`` the same with
    the original's algorithm (:mod:`bench.original`: the full-batch reference pass, method §6.2). Target: ours <= 0.85
    of the original's ratio at both batch sizes. Each image of a batch has its own reference pass (its own ε, so
    that it equals its single generation), so batch 4 saves per image what batch 1 saves; the original shares one ε
    across the batch, which is what made a batch differ from its single images.
(c) ``hook_overhead_ratio``: the U-Net with our processors (sketch hints + non-unit layer scales) at batch 3 over the
    same U-Net without them at batch 3. Target <= 1.03.
(d) ``sketch_encoder_calls`` (per generation, target exactly 1) and ``reference_encoder_calls_repeat`` (on a repeated
    generation with the same reference, target 0): the real :class:`lib_colorize.pipeline.Colorizer`, with a tiny
    random checkpoint and a tiny CLIP written to a temporary folder, counted with forward hooks on the encoders.
(e) ``peak_memory_ratio``: peak memory of a generation (both scales + injection) over that of a plain two-row-CFG
    generation with the same U-Net, sampler, steps and VAE decode, both after a warm-up generation, one subprocess
    per configuration.

Modules, one concern each: :mod:`.sizes` (bench sizes, guidance setting), :mod:`.models` (random models in the
released layout), :mod:`.clock`, :mod:`.steps` (a-c), :mod:`.flops` (their arithmetic), :mod:`.encoders` (d),
:mod:`.memory` (peak tracking), :mod:`.memory_workers` (e), :mod:`.endurance`, :mod:`.gpu` (seconds per image),
:mod:`.report` (tables and the JSON line), :mod:`.original` (the original's injection), :mod:`.__main__`.
The benchmark uses the library; the library never imports it.
"""
