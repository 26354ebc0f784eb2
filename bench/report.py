"""The bench's report: Markdown tables for a reader (bench/RESULTS.md records them) and, as the last line, one JSON
object with exactly the keys of :data:`JSON_KEYS`, for a machine."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from typing import Dict, Sequence

import torch

from .clock import median
from .steps import RATIO_TERMS, StepBench

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

#: ours over the original's injection ratio, by batch size
INJECTION_TARGETS = {1: "<= 0.85", 4: "<= 0.85"}

TARGETS = {
    "dual_guidance_ratio": "<= 1.55 (floor 1.5)",
    "hook_overhead_ratio": "<= 1.03",
    "injection_ratio_b1": f"ours/original {INJECTION_TARGETS[1]}",
    "injection_ratio_b4": f"ours/original {INJECTION_TARGETS[4]}",
    "sketch_encoder_calls": "== 1",
    "reference_encoder_calls_repeat": "== 0",
}

MIB = 2 ** 20


def machine_description() -> dict:
    """CPU model, cores, torch threads, the commit measured, software versions and the GPU, for the header."""
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


def format_value(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[format_value(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n" + "\n".join(lines)   # a blank line first: Markdown tables must not follow a heading line directly


def step_table(bench: StepBench, flops: Dict[str, float]) -> str:
    """(a)-(c): per configuration, rows and FLOPs per step, and its times."""
    rows = []
    for config in bench.configs.values():
        middle = median(config.times)
        spread = (max(config.times) - min(config.times)) / middle
        rows.append([config.name, config.label, config.rows_per_step(), flops[config.name] / 1e9, 1000 * middle,
                     1000 * min(config.times), f"{100 * spread:.0f}%", 1000 * median(config.wall)])
    return markdown_table(["config", "what", "U-Net rows/step", "GFLOP/step", "ms median", "ms min", "spread",
                           "wall ms median"], rows)


def ratio_table(bench: StepBench, measured: dict, minima: dict, arithmetic: Dict[tuple, dict]) -> str:
    """The timed figures beside their arithmetic (FLOP ratios, by (label, resolution)), ours over the original's,
    and the denoiser's own cost."""
    rows = [[key, measured[key], minima[key]] + [a[key] for a in arithmetic.values()] + [TARGETS.get(key, "")]
            for key in RATIO_TERMS]
    for batch, target in INJECTION_TARGETS.items():
        ours, original = f"injection_ratio_b{batch}", f"injection_ratio_original_b{batch}"
        rows.append([f"ours / original (b{batch})", measured[ours] / measured[original],
                     minima[ours] / minima[original]] + [a[ours] / a[original] for a in arithmetic.values()] + [target])
    rows.append(["guided_call / unhooked U-Net, 3 rows", bench.ratio("off_b1", "plain3"),
                 bench.ratio_of_minima("off_b1", "plain3")] + [1.0 for _ in arithmetic] + ["(c) incl. the denoiser"])
    headers = ["ratio", "measured", "of minima"] + [f"FLOPs {label} {res}px" for label, res in arithmetic]
    return markdown_table(headers + ["target"], rows)


def same_result_table(bench: StepBench) -> str:
    rows = [[f"max abs(ours - original), b{batch}", bench.max_abs_diff(f"ours_b{batch}", f"original_b{batch}")]
            for batch in INJECTION_TARGETS]
    return markdown_table(["same result (denoiser outputs of the warm-up step)", "value"], rows)


def encoder_table(calls: dict) -> str:
    """(d): per generation, the encoder calls, token-cache encodes, rows per U-Net call and processor sets left."""
    rows = []
    for index, generation in enumerate(calls["generations"]):
        stats = generation["stats"]
        unet_calls = max(1, stats.get("unet_calls", 0))
        rows.append([f"generation {index + 1}" + (" (same reference)" if index else ""),
                     generation["sketch_encoder_calls"], generation["reference_encoder_calls"],
                     generation["token_cache_encode_calls"], stats.get("unet_rows", 0) / unet_calls,
                     stats.get("write_rows", 0) / unet_calls, generation["live_hooks_after"]])
    return markdown_table(["generation", "sketch encoder calls", "reference encoder calls", "token-cache encodes",
                           "U-Net rows/call", "write rows/call", "hooks left"], rows)


def _over(value, base) -> float:
    return value / base if base > 0 else float("nan")


def memory_table(memory: dict) -> str:
    """(e): each configuration's peak split by segment, over the plain generation's."""
    base = memory["plain"]["peak_bytes"]
    base_sampling = memory["plain"]["segments"].get("sampling", float("nan"))
    rows = []
    for config, result in memory.items():
        segments = result["segments"]
        mib = [segments.get("conditioning"), segments.get("sampling"), segments.get("decode"), result["peak_bytes"]]
        rows.append([config, result["method"]] + [_mib(v) for v in mib]
                    + [_over(result["peak_bytes"], base), _over(segments.get("sampling", float("nan")), base_sampling),
                       _mib(result["first_run_peak_bytes"]), _mib(result["retained_bytes"])])
    return markdown_table(["generation", "measure", "conditioning MiB", "sampling MiB", "decode MiB", "peak MiB",
                           "peak over plain", "sampling over plain", "first run MiB", "retained MiB"], rows)


def _mib(value):
    return value / MIB if isinstance(value, (int, float)) else value


def peak_memory_ratio(memory: dict) -> float:
    """Peak of the generation with both scales and our injection (else the last measured) over the plain one's."""
    worst = "ours" if "ours" in memory else list(memory)[-1]
    return _over(memory[worst]["peak_bytes"], memory["plain"]["peak_bytes"])


def seconds_table(rows: list) -> str:
    return markdown_table(["resolution", "injection", "steps", "s/image", "peak VRAM GiB"],
                          [[r["resolution"], r["injection"], r["steps"], r["seconds"],
                            r["peak_vram_bytes"] / 2 ** 30 if r["peak_vram_bytes"] is not None else None]
                           for r in rows])


def figures_table(figures: dict) -> str:
    return markdown_table(["key", "value", "target"], [[key, figures[key], TARGETS.get(key, "")] for key in JSON_KEYS])


def json_line(figures: dict) -> str:
    """The machine-readable last line: exactly :data:`JSON_KEYS`, in that order."""
    return json.dumps({key: figures[key] for key in JSON_KEYS})
