"""Reading a plain weight file (OpenCLIP, line extractors) into named CPU tensors, safely and only what is needed.

``.safetensors`` files are read tensor by tensor, so only the keys asked for are loaded. Anything else goes
through ``torch.load(weights_only=True)`` (a file that needs arbitrary Python objects is refused, never
unpickled), memory-mapped where the file format allows it, so tensors that are not kept are never read into
memory. (ColorizeDiffusion checkpoints have their own reader, :mod:`lib_colorize.checkpoint`.)
"""
from __future__ import annotations

import os
import pickle
import warnings
from typing import Callable, Mapping, Optional

import torch

from ..errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
_DATA_PARALLEL_PREFIX = "module."


def _normalise(key: str) -> str:
    return key[len(_DATA_PARALLEL_PREFIX):] if key.startswith(_DATA_PARALLEL_PREFIX) else key


def _torch_load(path: str):
    with warnings.catch_warnings():  # torch 2.1 warns about TypedStorage while loading old files
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # a pre-zip (legacy) file cannot be memory-mapped
            if "mmap" not in str(error):
                raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: "str | os.PathLike[str]", keep: Optional[Callable[[str], bool]] = None
                    ) -> dict[str, torch.Tensor]:
    """Tensors of a weight file on CPU, keyed as stored after unwrapping.

    A ``{"state_dict": {...}}`` wrapper is unwrapped and a DataParallel ``module.`` prefix removed; ``keep``
    (applied to those keys) selects what is read. Raises :class:`CheckpointError` for unreadable files, for
    pickles that need more than tensors and containers, and for entries that are not named tensors.
    """
    path = os.fspath(path)
    try:
        if path.endswith(SAFETENSORS_SUFFIX):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as handle:
                return {_normalise(k): handle.get_tensor(k) for k in handle.keys()
                        if keep is None or keep(_normalise(k))}
        data = _torch_load(path)
    except pickle.UnpicklingError as error:
        raise CheckpointError(path, "refused: the file holds Python objects other than tensors, which could run "
                                    "code when loaded (only weights_only loading is allowed). Re-download it "
                                    f"from the original source. Detail: {str(error).splitlines()[0]}") from error
    except Exception as error:
        raise CheckpointError(path, f"cannot be read as a weight file ({type(error).__name__}: {error})") from error
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is not a named tensor")
        name = _normalise(key)
        if keep is None or keep(name):
            tensors[name] = value
    return tensors


__all__ = ["read_state_dict"]
