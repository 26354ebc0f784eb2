"""The benchmark (``python -m bench``): a smoke run, and the exact quantities it reports.

Timing targets are NOT asserted: timings on shared CI machines are noise, and the figures of the smoke run mean
nothing. Asserted are the machine-readable last line of a smoke run and the quantities that are exact: encoder
call counts, U-Net rows per step, FLOP counts of the released size (meta device, no compute), ours' equality with
the original's injection, one memory worker subprocess, and an endurance run leaving nothing behind.

Everything runs on one torch thread, as the bench does: two OpenMP threads crawl on a busy two-core machine.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import report
from bench.__main__ import main
from bench.endurance import endurance
from bench.flops import config_flops, flop_ratios, meta_step_bench
from bench.memory_workers import measure_memory
from bench.sizes import SIZES
from bench.steps import RATIO_TERMS, StepBench

QUICK = SIZES["quick"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_json_keys_are_the_recorded_keys():
    assert report.JSON_KEYS == (
        "dual_guidance_ratio", "hook_overhead_ratio", "injection_ratio_b1", "injection_ratio_b4",
        "injection_ratio_original_b1", "injection_ratio_original_b4", "sketch_encoder_calls",
        "reference_encoder_calls_repeat", "peak_memory_ratio")
    assert tuple(RATIO_TERMS) == report.JSON_KEYS[:6]


def test_smoke_run_ends_with_the_json_line(capsys):
    assert main(["--quick", "--no-memory"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    figures = json.loads(lines[-1])
    assert list(figures) == list(report.JSON_KEYS)
    assert figures["sketch_encoder_calls"] == 1
    assert figures["reference_encoder_calls_repeat"] == 0
    for key in RATIO_TERMS:
        value = figures[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert math.isnan(figures["peak_memory_ratio"])   # --no-memory
    assert "## figures" in out   # the readable table comes before the JSON line
    assert "command: python -m bench --quick" in out


def test_memory_worker_runs_as_a_subprocess_from_anywhere(tmp_path, monkeypatch):
    """The worker is ``python -m bench.memory_workers``: it finds both packages from another folder and without
    PYTHONPATH, and reports a peak for every segment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = measure_memory(QUICK, torch.device("cpu"), torch.float32, threads=1, configs=("ours",),
                            log=lambda s: None)["ours"]
    assert result["config"] == "ours"
    assert set(result["segments"]) == {"conditioning", "sampling", "decode"}
    if result["method"] != "unavailable":
        assert result["peak_bytes"] == max(result["segments"].values()) > 0


def test_ours_equals_the_original_full_batch_pass():
    """Ours (distinct rows, reference pass stopped after the last bank write) gives the original's result."""
    step = StepBench(QUICK, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        for batch in (1, 4):
            ours = step.configs[f"ours_b{batch}"].call()
            original = step.configs[f"original_b{batch}"].call()
            torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def released_step_flops():
    """The step configurations of the released U-Net at 512 px on the meta device, each called once while its
    FLOPs are counted."""
    step = meta_step_bench(SIZES["full"], 512)
    return step, config_flops(step)


def test_arithmetic_floors_of_the_released_size(released_step_flops):
    """Dual guidance is exactly 1.5 plain CFG, the processors add no matmul work, and the distinct-rows reference
    pass is cheaper than the original's full-batch one."""
    figures = flop_ratios(released_step_flops[1])
    assert abs(figures["dual_guidance_ratio"] - 1.5) < 1e-9
    assert figures["hook_overhead_ratio"] == 1.0
    assert figures["injection_ratio_b1"] < figures["injection_ratio_original_b1"]
    assert figures["injection_ratio_b1"] / figures["injection_ratio_original_b1"] <= 0.85
    # every image has its own reference pass (its own ε), so batch 4 saves what batch 1 saves, per image
    assert figures["injection_ratio_b4"] / figures["injection_ratio_original_b4"] <= 0.85


def test_rows_per_step(released_step_flops):
    rows = {name: config.rows_per_step() for name, config in released_step_flops[0].configs.items()}
    assert rows == {"plain3": 3, "hooked3": 3, "cfg2": 2, "off_b1": 3, "ours_b1": 5, "original_b1": 6,
                    "off_b4": 12, "ours_b4": 20, "original_b4": 24}


def test_endurance_leaves_no_processors_and_bounds_the_cache(tmp_path):
    """Smoke-sized: varied generations leave no processor set installed and the token cache stays bounded.
    Memory growth is reported by ``python -m bench --endurance 50``, not asserted here."""
    result = endurance(10, str(tmp_path), torch.device("cpu"), log=lambda *a: None)
    assert result["generations"] == 10
    assert result["max_live_hooks_between"] == 0
    assert result["token_cache_entries"] == 8   # ten references, eight kept
    assert result["rss_mib_end"] > 0


def test_mode_bench_counts_what_each_enhance_mode_adds(tmp_path):
    """``python -m bench.modes``: every mode's step runs, changes the output, and costs what its processors add
    (FLOPs are exact; timings are not asserted)."""
    from bench import modes
    from lib_colorize.processors import live_count

    steps = modes.mode_bench(SIZES["quick"], torch.device("cpu"), torch.float32, str(tmp_path))
    modes.count_flops(steps)
    flops = {name: step.flops / steps["default"].flops for name, step in steps.items()}
    assert set(flops) == set(modes.MODES)
    assert 1.0 <= flops["v2 style"] < 1.05                   # a modulation per decoder block: nearly free
    assert 1.8 < flops["v1 BG"] < 2.1                        # every attn2 twice (character and background pass)
    assert flops["v1.5 FG+BG"] > flops["v1.5 BG"] > flops["v1 BG"]   # + LoRA, + the doubled context
    default = steps["default"].call()
    # The bench's local-token encoder returns the reference tokens for any image, so the two halves of the split
    # attention get the same tokens: there v1 BG and v2 FG equal the default step (split = whole attention).
    for name in ("v1 BG", "v2 FG"):
        torch.testing.assert_close(steps[name].call(), default, rtol=1e-5, atol=1e-5)
    for name in ("v1.5 BG", "v1.5 FG+BG", "v2 style", "v2 BG", "v2 style+BG"):
        assert (steps[name].call() - default).abs().max() > 0.1, name
    assert live_count() == 0
    table = modes.report(steps, {name: 1.0 for name in steps if name != "default"})
    assert all(f"| {name} |" in table for name in modes.MODES if name != "default")
