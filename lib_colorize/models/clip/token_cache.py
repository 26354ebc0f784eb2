"""Reference tokens cached by image content: a folder run or a repeated generation encodes its reference once."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from ...module_info import module_device, module_dtype
from .image_tower import ReferenceEncoder


def image_digest(image: torch.Tensor) -> str:
    """sha256 over shape, dtype and the raw bytes of the (contiguous, CPU) tensor."""
    t = image.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReferenceTokenCache:
    """Bounded LRU of full reference tokens (method §2.3) keyed by image content and encoder identity.

    ``get_or_encode(encoder, image)`` returns ``encoder.encode_full(image)`` (a copy), encoding only on a miss;
    ``encode_calls`` counts the encoder calls (0 on a repeated generation with the same reference).
    """

    def __init__(self, max_entries: int = 8):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self._entries: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()
        self.encode_calls = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(encoder: ReferenceEncoder, image: torch.Tensor) -> tuple:
        """(image digest, encoder instance, encoder dtype, encoder device)."""
        dtype, device = module_dtype(encoder), module_device(encoder)
        return (image_digest(image), getattr(encoder, "instance_id", id(encoder)), str(dtype), str(device))

    def get_or_encode(self, encoder: ReferenceEncoder, image: torch.Tensor, local: bool = False) -> torch.Tensor:
        """Full tokens (B, 1+N, D), or patch tokens (B, N, D) with ``local=True``."""
        key = self.key(encoder, image)
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if tokens is None:
            tokens = encoder.encode_full(image)
            with self._lock:
                self.encode_calls += 1
                self._entries[key] = tokens
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        out = tokens.clone()
        return out[:, 1:] if local else out

    def clear(self) -> None:
        """Drop all entries (counters are kept)."""
        with self._lock:
            self._entries.clear()
