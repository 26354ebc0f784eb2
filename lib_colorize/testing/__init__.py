"""Test and bench helpers: random checkpoints in the released key layout (``checkpoints.py``).

Names are imported lazily so that ``python -m lib_colorize.testing.checkpoints`` runs cleanly.
"""
from __future__ import annotations

__all__ = ["make_checkpoint", "make_sd_checkpoint", "released_layout"]


def __getattr__(name):
    if name in __all__:
        from . import checkpoints
        return getattr(checkpoints, name)
    raise AttributeError(name)
