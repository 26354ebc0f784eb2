"""Files a command-line run needs, small enough for tests: a tiny checkpoint in the released key layout, tiny
OpenCLIP weights with the model config that registers their architecture, a reference image and line art."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def draw_sketch(path: Path, size=(96, 64), seed: int = 0) -> Path:
    """Black strokes on white paper, saved in the format of ``path``'s suffix."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size[1], size[0], 3), 255, np.uint8)
    for _ in range(6):
        y = rng.integers(0, size[1])
        pixels[y:y + 2, :] = 0
        x = rng.integers(0, size[0])
        pixels[:, x:x + 2] = 0
    Image.fromarray(pixels).save(path)
    return path


def draw_reference(path: Path, left=(220, 40, 40), right=(40, 90, 220)) -> Path:
    colours = np.zeros((80, 80, 3), np.uint8)
    colours[:, :40] = left
    colours[:, 40:] = right
    Image.fromarray(colours).save(path)
    return path


def make_cli_files(root: Path) -> dict:
    """Tiny weights and images in ``root``: keys ``checkpoint`` (v1, context 32, named like a released eps file),
    ``clip_weights`` (``.bin``), ``clip_config`` (open_clip model-config JSON), ``clip_name``, ``reference``,
    ``root``."""
    from .checkpoints import make_checkpoint
    from .clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip

    root = Path(root)
    register_tiny_clip()
    clip_weights = make_tiny_clip_weights(str(root / "tiny_clip.bin"))
    config = root / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    checkpoint = make_checkpoint(root / "mult-eps-ft.safetensors", version="v1", size="tiny",
                                 context_dim=TINY_CLIP_CONFIG["embed_dim"])
    return {"checkpoint": str(checkpoint), "clip_weights": str(clip_weights), "clip_config": str(config),
            "clip_name": TINY_CLIP_NAME, "reference": str(draw_reference(root / "reference.png")), "root": root}


__all__ = ["draw_sketch", "draw_reference", "make_cli_files"]
