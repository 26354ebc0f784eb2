"""Line extractors for ``sketch_mode="extract"`` (method §8.2).

Each extractor turns an RGB drawing into a (1, 3, size, size) float32 CPU tensor in the sketch domain
(background -1, lines +1, values in [-1, 1]). The image is first resized to the square (size, size) where
``size`` = max(H, W) of the target (mid-2024 behaviour, method §12.2 row 9), like the original's
``Resize((m, m), bicubic, antialias)`` on the PIL image (= PIL bicubic; a no-op when the caller already resized);
the caller passes ``size`` and later resizes/pads the tensor to the target (method §8.2).

Registry: :data:`EXTRACTORS` maps the UI/API names to :class:`ExtractorSpec`. Names are looked up only in the
registry; they never become paths. Learned extractors load their weight file (``spec.weights``, a
:class:`~lib_colorize.weights.WeightFile`) from ``models_dir``, the extension's folder of the models folder (None: the
Hugging Face cache), downloading it when allowed, and are cached per (name, device, dtype) until
:func:`unload_extractors`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lib_colorize.errors import InvalidInput
from lib_colorize.images import decode_image
from lib_colorize.randomness import untouched_global_rng

from lib_colorize.weights import (LINE_EXTRACTOR_FILES, ProgressCallback, WeightFile, ensure_weight_file,
                                  find_weight_file)

from . import anime2sketch, erika, sketch_keras, standard
from .loading import load_into

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXTRACTOR", "EXTRACTORS", "ExtractorSpec", "extract_lines", "find_weights", "get_spec",
    "load_extractor", "prepare_image", "unload_extractors", "weights_path",
]


@dataclass(frozen=True)
class ExtractorSpec:
    """One line extractor: its UI/API name, its label, and the weight file of a learned one (None for the
    model-free one)."""

    name: str
    label: str
    weights: WeightFile | None = None

    @property
    def needs_weights(self) -> bool:
        return self.weights is not None

    @property
    def weight_file(self) -> str | None:
        """The local file name in the models folder."""
        return self.weights.filename if self.weights else None

    @property
    def source_url(self) -> str | None:
        return self.weights.source_url if self.weights else None


EXTRACTORS: dict[str, ExtractorSpec] = {
    "lineart_standard": ExtractorSpec("lineart_standard", "Standard (no model; ControlNet lineart_standard)"),
    "lineart": ExtractorSpec("lineart", "Anime2Sketch (lineart)", LINE_EXTRACTOR_FILES["lineart"]),
    "lineart_denoise": ExtractorSpec("lineart_denoise", "Manga line / Erika (lineart_denoise)",
                                     LINE_EXTRACTOR_FILES["lineart_denoise"]),
    "lineart_keras": ExtractorSpec("lineart_keras", "SketchKeras (lineart_keras)",
                                   LINE_EXTRACTOR_FILES["lineart_keras"]),
}

#: The original app's default line extractor (method §12.3).
DEFAULT_EXTRACTOR = "lineart_keras"

_IMPLEMENTATIONS: dict[str, ModuleType] = {
    "lineart": anime2sketch,
    "lineart_denoise": erika,
    "lineart_keras": sketch_keras,
}

_cache: dict[tuple[str, str, torch.dtype], nn.Module] = {}
_lock = threading.Lock()


def get_spec(name: Any) -> ExtractorSpec:
    """The registered spec for ``name``; InvalidInput(field='line_extractor') for anything else."""
    spec = EXTRACTORS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise InvalidInput("line_extractor", f"unknown line extractor {name!r}; valid: {', '.join(EXTRACTORS)}")
    return spec


def find_weights(name: str, models_dir: "str | os.PathLike[str] | None" = None):
    """The existing weight file of the extractor ``name`` in ``models_dir`` (None: the Hugging Face cache), else
    None (also for the model-free extractor)."""
    spec = get_spec(name)
    return find_weight_file(spec.weights, models_dir) if spec.weights else None


def weights_path(name: str, models_dir: "str | os.PathLike[str] | None" = None, *, allow_download: bool = True,
                 progress: ProgressCallback | None = None):
    """The weight file of the learned extractor ``name``, downloaded into ``models_dir`` if needed and allowed;
    :class:`~lib_colorize.errors.MissingWeights` otherwise."""
    spec = get_spec(name)
    if spec.weights is None:
        raise InvalidInput("line_extractor", f"{name!r} has no network")
    return ensure_weight_file(spec.weights, models_dir, allow_download=allow_download, progress=progress)


def _device_and_dtype(device: Any, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # one cache entry for "cuda" and "cuda:0"
    if dev.type == "cpu" or not dtype.is_floating_point:
        return dev, torch.float32  # half-precision convolutions are slow or missing on CPU
    return dev, dtype


def load_extractor(name: str, *, models_dir=None, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                   allow_download: bool = True, progress: ProgressCallback | None = None) -> nn.Module:
    """The cached network of a learned extractor on ``device`` in ``dtype`` (loaded on first use)."""
    spec = get_spec(name)
    if not spec.needs_weights:
        raise InvalidInput("line_extractor", f"{name!r} has no network")
    dev, dt = _device_and_dtype(device, dtype)
    key = (name, str(dev), dt)
    with _lock:
        net = _cache.get(key)
        if net is None:
            path = weights_path(name, models_dir, allow_download=allow_download, progress=progress)
            started = time.monotonic()
            logger.info("loading line extractor %s from %s", name, path)
            net = load_into(_IMPLEMENTATIONS[name].build_network(), path).eval().requires_grad_(False)
            net = net.to(dtype=dt)
            _cache[key] = net
            logger.info("loaded line extractor %s in %.1f s", name, time.monotonic() - started)
    return net.to(dev)


def unload_extractors(*, to_cpu_only: bool = False) -> None:
    """Free the cached networks (or, with ``to_cpu_only``, keep them but move them to CPU memory)."""
    with _lock:
        if to_cpu_only:
            for net in _cache.values():
                net.to("cpu")
        else:
            _cache.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: :func:`lib_colorize.images.decode_image` (transparency over white paper), then
    PIL bicubic resize to the square."""
    image = decode_image(image, "sketch")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@torch.no_grad()
def extract_lines(name: str, image: Image.Image, size: int, *, models_dir=None, device: Any = "cpu",
                  dtype: torch.dtype = torch.float32, allow_download: bool = True,
                  offload: bool = False, progress: ProgressCallback | None = None) -> torch.Tensor:
    """Extract the line art of ``image`` with the extractor ``name`` (method §8.2).

    Returns a (1, 3, size, size) float32 CPU tensor, sketch domain (background -1, lines +1), values in [-1, 1].
    ``device``/``dtype`` select where the network runs (fp16/bf16 only on CUDA; CPU always float32). With
    ``offload`` the network is moved back to CPU memory afterwards. Raises InvalidInput for an unknown name or a bad
    size, MissingWeights when a weight file is absent and cannot be downloaded, CheckpointError for a bad file.
    """
    spec = get_spec(name)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 16 <= int(size) <= 8192:
        raise InvalidInput("size", f"the extraction size must be an integer in [16, 8192], got {size!r}")
    if not isinstance(image, Image.Image):
        raise InvalidInput("sketch", f"expected a PIL image, got {type(image).__name__}")
    rgb = prepare_image(image, int(size))
    if not spec.needs_weights:
        return standard.extract(rgb)
    dev, dt = _device_and_dtype(device, dtype)
    with untouched_global_rng():   # building the network initialises weights from the global RNG
        net = load_extractor(name, models_dir=models_dir, device=dev, dtype=dt, allow_download=allow_download,
                             progress=progress)
    try:
        out = _IMPLEMENTATIONS[name].run(net, rgb, dev, dt)
    finally:
        if offload and dev.type != "cpu":
            net.to("cpu")
    return out.to(torch.float32)
