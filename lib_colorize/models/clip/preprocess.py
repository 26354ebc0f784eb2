"""Reference preprocessing for the OpenCLIP image tower (method §2.1, the mid-2024 kornia form): squash resize
with kornia's antialias pre-blur, then CLIP normalisation."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

# CLIP image normalisation (method §2.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def gaussian_taps(sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """1-D Gaussian taps of the kornia antialias pre-blur (method §2.1 step 1).

    k = int(max(4 sigma, 3)), +1 if even; g(i) = exp(-i^2 / (2 sigma^2)) for i = -k//2 .. k//2, normalised to
    sum 1. Computed in float64, returned as ``dtype``. Shape (k,).
    """
    k = int(max(4.0 * sigma, 3.0))
    if k % 2 == 0:
        k += 1
    i = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(i**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def antialias_sigma(factor: float) -> float:
    """sigma = max((f - 1) / 2, 0.001) for a per-axis downscale factor f = size_in / size_out (method §2.1)."""
    return max((factor - 1.0) / 2.0, 0.001)


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate every channel of x (B, C, H, W) with ``taps`` along ``dim`` (2 = H, 3 = W), reflect padding."""
    b, c, h, w = x.shape
    k = taps.numel()
    p = k // 2
    if dim == 3:
        x = F.pad(x, (p, p, 0, 0), mode="reflect")
        weight = taps.view(1, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, p, p), mode="reflect")
        weight = taps.view(1, 1, k, 1)
    weight = weight.to(x.dtype).expand(c, 1, *weight.shape[2:]).contiguous()
    return F.conv2d(x, weight, groups=c)


def gaussian_preblur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, same size: along W with sigma_x, then along H with sigma_y.

    (B, C, H, W) -> (B, C, H, W). kornia's ``gaussian_blur2d(..., border_type='reflect', separable=True)``.
    """
    x = _blur_axis(x, gaussian_taps(sigma_x, torch.float64, x.device), dim=3)
    return _blur_axis(x, gaussian_taps(sigma_y, torch.float64, x.device), dim=2)


def kornia_resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``kornia.geometry.resize(x, size, 'bicubic', align_corners=True, antialias=True)`` (kornia 0.6.6-0.7.4).

    Method §2.1: unchanged if already ``size``; if max(f_y, f_x) > 1 with f = H/size_h, W/size_w, pre-blur
    with :func:`gaussian_preblur` (sigma per axis from :func:`antialias_sigma`); then
    ``F.interpolate(size, mode='bicubic', align_corners=True)``, no clamping. (B, C, H, W) -> (B, C, *size).
    """
    h, w = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return x
    fy, fx = h / size[0], w / size[1]
    if max(fy, fx) > 1:
        x = gaussian_preblur(x, antialias_sigma(fy), antialias_sigma(fx))
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> CLIP input: x' = ((x + 1)/2 - mean) / std per channel (method §2.1). (B, 3, H, W)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x + 1.0) / 2.0 - mean) / std


def preprocess_reference(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Reference (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, size, size), float32 (method §2.1).

    Squash resize (aspect ratio not kept) in the kornia form, then :func:`clip_normalize`.
    """
    x = images.float() if images.dtype != torch.float64 else images
    return clip_normalize(kornia_resize(x, (size, size)))
