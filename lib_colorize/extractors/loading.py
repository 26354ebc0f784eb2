"""Loading a line extractor's weight file into its network (method §8.2).

The file is found or downloaded by :mod:`lib_colorize.weights` (its record is in
:data:`lib_colorize.weights.LINE_EXTRACTOR_FILES`) and read with :func:`lib_colorize.weights.read_state_dict`
(``weights_only``: a file that needs arbitrary Python objects is refused, never unpickled).
"""
from __future__ import annotations

import os

from torch import nn

from lib_colorize.errors import CheckpointError
from lib_colorize.weights import read_state_dict

_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm counters: unused in eval, absent from some files


def load_into(net: nn.Module, path: "str | os.PathLike[str]") -> nn.Module:
    """Load ``path`` into ``net`` after checking that keys and shapes match exactly (BatchNorm counters aside)."""
    state = read_state_dict(path)
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith(_IGNORED_SUFFIXES)}
    given = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:3])}{more}")
        raise CheckpointError(path, f"does not match the {type(net).__name__} architecture: " + "; ".join(parts))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in given.items()}, strict=False)
    return net
