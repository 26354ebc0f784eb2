"""Random models in the released key layout for the benchmark, and its synthetic test images.

The step timings and the memory runs build their models in memory (no file, any width); the encoder-call count
and the endurance run go through the library's own loaders with a tiny checkpoint and a tiny CLIP written to a
temporary folder, so they exercise the path a user's generation takes.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Sequence

import torch

from lib_colorize.testing.checkpoints import Dims

from .sizes import REFERENCE_GUIDANCE, SKETCH_GUIDANCE

BENCH_CLIP_NAME = "cd-bench-clip"


def _random_state(layout: dict, seed: int) -> dict:
    from lib_colorize.testing.checkpoints import random_tensor

    return {key: random_tensor(key, shape, kind, seed) for key, (shape, kind) in layout.items()
            if not kind.startswith("buffer:")}


def _frozen(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_unet(dims: Dims, device, dtype, seed: int = 0) -> torch.nn.Module:
    """Random U-Net of ``dims`` in the released key layout (loaded with ``strict=True``)."""
    from lib_colorize.models import UNetModel
    from lib_colorize.testing.checkpoints import unet_layout

    return _frozen(UNetModel.from_state_dict(_random_state(unet_layout(dims), seed)), device, dtype)


def build_checkpoint_models(dims: Dims, device, dtype, seed: int = 0) -> SimpleNamespace:
    """U-Net, VAE and sketch encoder built in memory from the released layout, shaped like a loaded checkpoint."""
    from lib_colorize.models import AutoencoderKL, SketchEncoder
    from lib_colorize.testing.checkpoints import sketch_encoder_layout, vae_layout

    vae = AutoencoderKL.from_state_dict(_random_state(vae_layout(dims), seed))
    sketch = SketchEncoder.from_state_dict(_random_state(sketch_encoder_layout(dims), seed))
    return SimpleNamespace(unet=build_unet(dims, device, dtype, seed), vae=_frozen(vae, device, dtype),
                           sketch_encoder=_frozen(sketch, device, dtype),
                           info=SimpleNamespace(version="v1", parameterization="eps"))


def bench_clip(context_dim: int, device, seed: int = 0):
    """A tiny open_clip image tower whose tokens are ``context_dim`` wide (the released U-Net's is 1024)."""
    import open_clip

    from lib_colorize.models.clip import ClipEncoders, ReferenceEncoder
    from lib_colorize.testing.clip import TINY_CLIP_CONFIG, register_tiny_clip

    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["embed_dim"] = int(context_dim)
    name = register_tiny_clip(f"{BENCH_CLIP_NAME}-{context_dim}", config)
    torch.manual_seed(seed)
    reference = ReferenceEncoder(open_clip.create_model(name, pretrained=None))
    return ClipEncoders(reference=reference.to(device).eval().requires_grad_(False), text=None, weights_path="",
                        arch=name)


def tiny_colorizer(workdir: str, device: torch.device, towers: Sequence[str] = ("visual", "text")):
    """The host-free :class:`~lib_colorize.pipeline.Colorizer` over a tiny random checkpoint and the tiny CLIP,
    both written to ``workdir`` and read back by the library's loaders."""
    from lib_colorize.checkpoint import load_checkpoint
    from lib_colorize.models.clip import load_clip
    from lib_colorize.pipeline import Colorizer
    from lib_colorize.testing.checkpoints import make_checkpoint
    from lib_colorize.testing.clip import TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip

    register_tiny_clip()
    checkpoint_path = make_checkpoint(os.path.join(workdir, "mult-eps-bench-tiny.safetensors"), "v1", "tiny",
                                      context_dim=32)   # the tiny CLIP's token width
    clip_path = make_tiny_clip_weights(os.path.join(workdir, "open_clip_pytorch_model.bin"))
    checkpoint = load_checkpoint(checkpoint_path, dtype=torch.float32, device=device)
    clip = load_clip(TINY_CLIP_NAME, weights=clip_path, device=device, towers=tuple(towers))
    return Colorizer(checkpoint, clip, device=device, dtype=torch.float32)


def synthetic_image(size: int, seed: int):
    """A deterministic RGB test image (smooth colour field with dark strokes), size x size."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    channels = [np.sin(2 * math.pi * (rng.rand() * 2 * xx + rng.rand() * 2 * yy + rng.rand())) for _ in range(3)]
    image = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    for _ in range(8):
        row = rng.randint(0, size)
        image[max(0, row - 1):row + 1] = 20
    return Image.fromarray(image.astype("uint8"))


REFERENCE_SEED = 100


def generation_options(resolution: int, injection: bool, sketch_seed: int = 0):
    """The options of a measured generation: both guidance scales on, synthetic sketch and reference (the reference
    the same in every generation, so a repeated one can take its tokens from the cache)."""
    from lib_colorize.options import ColorizeOptions

    return ColorizeOptions(enabled=True, sketch=synthetic_image(resolution, sketch_seed),
                           reference=synthetic_image(resolution, REFERENCE_SEED),
                           reference_guidance=REFERENCE_GUIDANCE, sketch_guidance=SKETCH_GUIDANCE, injection=injection)
