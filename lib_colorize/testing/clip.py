"""A tiny open_clip architecture and random weights for it, for tests, benchmarks and smoke runs (method §10.3 #12-13).

``cd-tiny-clip`` has the token geometry of ViT-H/14 (224 px, patch 14 -> 16x16 = 256 patch tokens + class token;
text context 77, CLIP vocabulary) with very small widths, so ``lib_colorize.models.clip`` can be exercised on CPU
in milliseconds and without network access.
"""
from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import tempfile
import threading
from typing import Optional

import torch
from torch import nn

TINY_CLIP_NAME = "cd-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_lock = threading.Lock()
_config_dir: Optional[str] = None


def register_tiny_clip(name: str = TINY_CLIP_NAME, config: Optional[dict] = None) -> str:
    """Register an open_clip architecture (default :data:`TINY_CLIP_CONFIG`) under ``name``; returns ``name``.

    Goes through open_clip's own registry (``open_clip.add_model_config`` on a JSON file written to a private
    temporary folder), so ``open_clip.create_model(name)`` works offline and survives registry rescans.
    Idempotent per process.
    """
    import open_clip

    global _config_dir
    config = copy.deepcopy(config if config is not None else TINY_CLIP_CONFIG)
    with _lock:
        if open_clip.get_model_config(name) == config:
            return name
        if _config_dir is None:
            _config_dir = tempfile.mkdtemp(prefix="cd-clip-configs-")
            # open_clip keeps what it read; the files are only needed until the process ends
            atexit.register(shutil.rmtree, _config_dir, True)
        path = os.path.join(_config_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) != config:
        raise RuntimeError(f"open_clip did not register the model config {name!r}")
    return name


def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Deterministic, non-trivial random values for every parameter (drawn in sorted-name order).

    LayerNorm: weight 1 + 0.2 n, bias 0.1 n; matrices and embeddings: n / sqrt(fan_in) (fan_in = prod of all
    but the first dim, or the first dim for ``proj``/``text_projection`` used as x @ P); other vectors 0.1 n;
    ``logit_scale`` kept.
    """
    ln_params = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            ln_params.update({id(module.weight), id(module.bias)})
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue
            n = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if id(p) in ln_params:
                value = (1.0 + 0.2 * n) if name.endswith("weight") else 0.1 * n
            elif p.ndim >= 2:
                fan_in = p.shape[0] if name.endswith("proj") or name.endswith("projection") else p[0].numel()
                value = n / fan_in**0.5
            else:
                value = 0.1 * n
            p.copy_(value.to(p.dtype))


def make_tiny_clip_model(seed: int = 0, name: str = TINY_CLIP_NAME) -> nn.Module:
    """``open_clip.create_model(name)`` (registered by :func:`register_tiny_clip`) with seeded random weights."""
    import open_clip

    register_tiny_clip(name)
    model = open_clip.create_model(name, pretrained=None)
    _randomize(model, torch.Generator().manual_seed(int(seed)))
    return model.eval()


def make_tiny_clip_weights(path: str, seed: int = 0, name: str = TINY_CLIP_NAME) -> str:
    """Save random weights of the tiny architecture in the open_clip CLIP state-dict layout; returns ``path``.

    ``.safetensors`` -> safetensors file, anything else -> ``torch.save`` of the plain state dict (loadable with
    ``weights_only=True``). Same seed -> same weights.
    """
    sd = {k: v.detach().clone().contiguous() for k, v in make_tiny_clip_model(seed, name).state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


__all__ = ["TINY_CLIP_NAME", "TINY_CLIP_CONFIG", "register_tiny_clip", "make_tiny_clip_model", "make_tiny_clip_weights"]
