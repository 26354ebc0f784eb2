"""Helpers shared by the learned extractors (method §8.2)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def uint8_to_unit(rgb: np.ndarray) -> torch.Tensor:
    """torchvision ``ToTensor`` on an (H, W, C) uint8 array: (1, C, H, W) float32 in [0, 1] (same op order)."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).unsqueeze(0)
    return t.to(torch.float32).div(255)


def run_padded(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Run ``net`` on ``x`` (N, C, H, W) whose H, W need not be multiples of the network's total stride.

    The original app feeds the square image directly, which only works when the side is a multiple of the
    network's stride (always true at 512; at other mid-2024 sizes such as 576 the Anime2Sketch U-Net, stride 256,
    fails). Here the input is padded to the next multiple, centred, with edge replication, and the output is cropped
    back. When the side already is a multiple this is exactly the original computation.
    """
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph == 0 and pw == 0:
        return net(x)
    top, left = ph // 2, pw // 2
    padded = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
    y = net(padded)
    return y[..., top:top + h, left:left + w]
