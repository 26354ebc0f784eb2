"""A bounded cache of per-generation results keyed by content (masks, VAE latents, encoder outputs).

Like :class:`lib_colorize.models.clip.ReferenceTokenCache` for the reference tokens: a repeated generation with
the same inputs computes nothing again. Keys are a kind plus parts; tensor parts are replaced by the digest of
their content (:func:`lib_colorize.models.clip.image_digest`), modules by their identity.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch


def _key_part(part: Any) -> Hashable:
    if isinstance(part, torch.Tensor):
        from .models.clip import image_digest

        return ("tensor", image_digest(part), str(part.device))
    if isinstance(part, torch.nn.Module):
        return ("module", id(part))
    if isinstance(part, (list, tuple)):
        return tuple(_key_part(p) for p in part)
    return part


class ContentCache:
    """LRU of computed values; ``computed[kind]`` counts the computations (misses) per kind."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = int(max_entries)
        self._entries: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self.computed: dict = {}

    def get_or_compute(self, kind: str, parts: tuple, compute: Callable[[], Any]) -> Any:
        key = (kind,) + tuple(_key_part(p) for p in parts)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()
        with self._lock:
            self.computed[kind] = self.computed.get(kind, 0) + 1
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
