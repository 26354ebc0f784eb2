"""Smoke test of the issue-6 benchmark (``python -m lib_colorize.bench --quick``).

Runs the whole bench in-process in its CI-sized mode (tiny U-Net at 128x128, the real Colorizer with a tiny random
checkpoint and a tiny CLIP; the memory part spawns two subprocesses) and checks the machine-readable last line.
Timing targets are NOT asserted: timings on shared CI machines are noise, and the figures of --quick mean nothing.
Only exact quantities are asserted: encoder call counts, U-Net rows per step and FLOP counts (meta device).
"""
from __future__ import annotations

import json
import math

from lib_colorize import bench

RATIO_KEYS = [k for k in bench.JSON_KEYS if k.endswith("_ratio") or "_ratio_" in k]


def test_json_keys_are_the_issue_keys():
    assert bench.JSON_KEYS == (
        "dual_guidance_ratio", "hook_overhead_ratio", "injection_ratio_b1", "injection_ratio_b4",
        "injection_ratio_original_b1", "injection_ratio_original_b4", "sketch_encoder_calls",
        "reference_encoder_calls_repeat", "peak_memory_ratio")
    assert len(RATIO_KEYS) == 7


def test_quick_bench_ends_with_the_json_line(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    figures = json.loads(lines[-1])
    assert list(figures) == list(bench.JSON_KEYS)
    assert figures["sketch_encoder_calls"] == 1
    assert figures["reference_encoder_calls_repeat"] == 0
    for key in RATIO_KEYS:
        value = figures[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert "## figures" in out   # the readable table comes before the JSON line


def test_ours_equals_the_original_full_batch_pass():
    """Ours (distinct rows, write pass stopped after the last bank write) gives the original's result."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the bench does: two OpenMP threads crawl on a busy two-core machine
    try:
        step = bench.StepBench(bench.SIZES["quick"], torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            for batch in (1, 4):
                ours = step.configs[f"ours_b{batch}"].call()
                original = step.configs[f"original_b{batch}"].call()
                torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_arithmetic_floors_of_the_released_size():
    """FLOPs counted on the meta device (no compute): dual guidance is exactly 1.5 plain CFG, the hooks add no
    matmul work, and the distinct-rows reference pass is cheaper than the original's full-batch one."""
    flops = bench.arithmetic(bench.SIZES["full"], 512)
    figures = bench.arithmetic_figures(flops)
    assert abs(figures["dual_guidance_ratio"] - 1.5) < 1e-9
    assert figures["hook_overhead_ratio"] == 1.0
    assert figures["injection_ratio_b1"] < figures["injection_ratio_original_b1"]
    assert figures["injection_ratio_b1"] / figures["injection_ratio_original_b1"] <= 0.85
    # every image has its own reference pass (its own ε), so batch 4 saves what batch 1 saves, per image
    assert figures["injection_ratio_b4"] / figures["injection_ratio_original_b4"] <= 0.85


def test_rows_per_step():
    import torch

    step = bench.StepBench(bench.SIZES["quick"], torch.device("meta"), torch.float32, unet=_meta_unet())
    with torch.no_grad():
        for config in step.configs.values():
            config.call()
    rows = {name: config.rows_per_step() for name, config in step.configs.items()}
    assert rows == {"plain3": 3, "hooked3": 3, "cfg2": 2, "off_b1": 3, "ours_b1": 5, "original_b1": 6,
                    "off_b4": 12, "ours_b4": 20, "original_b4": 24}


def _meta_unet():
    import torch

    from lib_colorize.models import UNetConfig, UNetModel

    dims = bench.bench_dims(bench.SIZES["quick"])
    with torch.device("meta"):
        return UNetModel(UNetConfig(model_channels=dims.model_channels, context_dim=dims.context_dim)).eval()


def test_endurance_mode_leaves_no_hooks_and_bounds_the_cache(tmp_path):
    """Issue 7 endurance, smoke-sized: varied generations leave no hook behind and the token cache stays
    bounded. Memory growth is reported by `python -m lib_colorize.bench --endurance 50`, not asserted here."""
    import torch

    from lib_colorize.bench import endurance

    result = endurance(10, str(tmp_path), torch.device("cpu"), log=lambda *a: None)
    assert result["generations"] == 10
    assert result["max_live_hooks_between"] == 0
    assert result["token_cache_entries"] <= 8
    assert result["rss_mib_end"] > 0
