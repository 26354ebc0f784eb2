"""``lineart_standard``: the model-free line extractor of A1111 ControlNet (method §8.2, ``invert-webui``).

Definition (ControlNet ``lineart_standard``, the same formula the original app's ``invert-webui`` mode uses),
on the RGB image ``x`` as float32 in [0, 255]:

    g         = GaussianBlur(x, sigma=6.0)                  (OpenCV, kernel size derived from sigma)
    intensity = clip(min over channels of (g - x), 0, 255)  (dark strokes are darker than their blurred surround)
    intensity = intensity / max(16, median(intensity[intensity > 8]))   (16 when no pixel exceeds 8)
    intensity = intensity * 127 -> clip(0, 255) -> uint8 (truncation), repeated to 3 channels
    result    = to_tensor(intensity) = uint8 / 255 * 2 - 1

The result is in the sketch domain: background -1, lines towards +1; values in [-1, 1].
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

SIGMA = 6.0
THRESHOLD = 8.0
MIN_SCALE = 16.0


def line_intensity(rgb: np.ndarray) -> np.ndarray:
    """(H, W) uint8 line intensity (0 = background, 255 = strongest line) of an (H, W, 3) uint8 RGB image."""
    x = np.asarray(rgb).astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), SIGMA)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    strong = intensity[intensity > THRESHOLD]
    # np.median of an empty selection is NaN and max(16, NaN) == 16 in the original; say so explicitly.
    scale = max(MIN_SCALE, float(np.median(strong))) if strong.size else MIN_SCALE
    intensity = intensity / scale * 127.0
    return intensity.clip(0, 255).astype(np.uint8)


def extract(rgb: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) float32 sketch-domain tensor in [-1, 1] (background -1) from an (H, W, 3) uint8 RGB image."""
    intensity = torch.from_numpy(line_intensity(rgb))
    x = intensity.to(torch.float32).div(255.0)
    x = (x - 0.5) / 0.5
    return x.expand(1, 3, *x.shape).contiguous()
