"""What a loaded ``nn.Module`` is made of: the dtype and device it computes in, and the memory its tensors hold."""
from __future__ import annotations

import torch
from torch import nn


def _first_tensor(module: nn.Module) -> torch.Tensor:
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
    raise ValueError(f"{type(module).__name__} has no parameters or buffers")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first parameter (first buffer when it has none): what its inputs are cast to."""
    return _first_tensor(module).dtype


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (first buffer when it has none)."""
    return _first_tensor(module).device


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each storage counted once (shared weights included once).

    This is the module's resident size wherever its tensors live (CPU or GPU), without activations.
    """
    seen: set = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


__all__ = ["module_dtype", "module_device", "parameter_bytes"]
