"""The bench's clock.

On CPU the bench runs torch on one thread and times process CPU seconds: the figure least disturbed by other
processes on a shared machine (with two threads, a busy neighbour core stalls every OpenMP barrier). On CUDA it
times wall seconds between synchronisations.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_clock(device: torch.device) -> Callable[[], float]:
    """Seconds of the step timings: wall time on CUDA, process CPU time elsewhere."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def clock_description(device: torch.device) -> str:
    if device.type == "cuda":
        return "wall seconds (synchronised)"
    return f"process CPU seconds, {torch.get_num_threads()} torch thread(s)"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
