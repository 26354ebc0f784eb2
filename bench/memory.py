"""Peak memory growth of a run, per segment, over the memory in use when it started.

CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set ``VmHWM`` of ``/proc/self/status``, reset
through ``/proc/self/clear_refs``; where the kernel refuses that reset, ``VmRSS`` sampled every millisecond by a
background thread. Freed memory is handed back to the system before each measurement (``malloc_trim``), and the
memory workers tell glibc to serve large blocks by ``mmap`` (:mod:`bench.memory_workers`), so that RSS follows the
live tensors.
"""
from __future__ import annotations

import ctypes
import gc
import re
import threading
from typing import Dict, Optional

import torch


def vm_kib(field: str) -> Optional[int]:
    """A ``Vm*`` field of ``/proc/self/status`` in KiB, or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and give the allocator's free memory back to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak VmRSS (KiB) sampled every millisecond by a background thread."""

    def __enter__(self) -> "RssSampler":
        self.peak = vm_kib("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, vm_kib("VmRSS") or 0)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, vm_kib("VmRSS") or 0)


def tracking_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda"
    if vm_kib("VmRSS") is None:
        return "unavailable"
    return "VmHWM" if reset_peak_rss() else "VmRSS sampled"


class PeakTracker:
    """Peak memory growth (bytes) of each segment of a run: :meth:`mark` closes one segment and starts the next.
    After the ``with`` block, ``retained`` is the memory the run kept."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = tracking_method(device)
        self._sampler: Optional[RssSampler] = None
        self.base = 0
        self.retained = 0
        self.peaks: Dict[str, float] = {}

    def _current(self) -> int:
        if self.method == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return 1024 * (vm_kib("VmRSS") or 0)

    def _reset(self) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "VmHWM":
            reset_peak_rss()
        elif self._sampler is not None:
            self._sampler.peak = self._current() // 1024

    def _peak(self) -> int:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "VmHWM":
            return 1024 * (vm_kib("VmHWM") or 0)
        if self._sampler is not None:
            return 1024 * max(self._sampler.peak, vm_kib("VmRSS") or 0)
        return 0

    def __enter__(self) -> "PeakTracker":
        release_memory()
        if self.method == "VmRSS sampled":
            self._sampler = RssSampler().__enter__()
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
        release_memory()
        self.retained = self._current() - self.base
