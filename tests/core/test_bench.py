"""Smoke test of the issue-6 benchmark (``python -m lib_colorize.bench --quick``).

Runs the whole bench in its CI-sized mode (tiny U-Net at 128x128, the real Colorizer with a tiny random checkpoint
and a tiny CLIP, two memory subprocesses) and checks the machine-readable last line. Timing targets are NOT
asserted: timings on shared CI machines are noise, and the figures of --quick mean nothing; only the counts are
exact.
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
    assert bench.main(["--quick", "--early-stop"]) == 0
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


def test_early_stop_prototype_keeps_the_result():
    """The early-stop prototype must not change a single value (the write pass's output is discarded)."""
    import torch

    step = bench.StepBench(bench.SIZES["quick"], torch.device("cpu"), torch.float32, early_stop=True)
    with torch.inference_mode():
        for batch in (1, 4):
            ours = step.configs[f"ours_b{batch}"].call()
            early = step.configs[f"ours_es_b{batch}"].call()
            original = step.configs[f"original_b{batch}"].call()
            assert torch.equal(ours, early)
            torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-5)
