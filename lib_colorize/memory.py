"""Giving freed memory back to the system on a CPU.

glibc keeps freed blocks below its (growing) mmap threshold in its heap, so after a multi-GB load -- a checkpoint
read tensor by tensor and cast, or a reference encoder dropped after its encode -- the process's resident memory
would keep the freed copies. :func:`release_memory` collects garbage and trims the heap.
"""
from __future__ import annotations

import ctypes
import gc
import sys


def release_memory() -> None:
    """``gc.collect()`` and ``malloc_trim(0)`` (Linux/glibc; a no-op elsewhere)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
