"""``lineart``: Anime2Sketch U-Net generator (method §8.2), weights ``netG.pth`` (lllyasviel/Annotators).

Network: a pix2pix-style U-Net with 8 stride-2 levels (input 3 channels, output 1, base width 64, instance norm
without affine parameters, every convolution with a bias). Level ``k`` (0 = outermost) maps ``outer`` to ``inner``
channels; widths from the outside in: (3 ->) 64, 128, 256, 512, 512, 512, 512, 512. Each level is a module whose
``model`` is an ``nn.Sequential``; the index layout of that Sequential is what the public weight file's keys encode
(``model.model.0.weight``, ``model.model.1.model.1.weight``, ... , possibly with a ``module.`` prefix):

* outermost: [conv 4x4/2, inner level, ReLU, transposed conv 4x4/2, tanh]          -> no skip concat
* middle:    [LeakyReLU 0.2, conv 4x4/2, IN, inner level, ReLU, transposed conv, IN] -> cat(skip, out)
* innermost: [LeakyReLU 0.2, conv 4x4/2, ReLU, transposed conv, IN]                 -> cat(skip, out)

The skip branch of a middle/innermost level carries the *activated* input LeakyReLU(x): the reference
implementation applies that LeakyReLU in place on the tensor it later concatenates. This module does the same
explicitly (no in-place ops).

Processing (``proceed`` in the original): x = to_tensor(img) in [-1, 1] (3 channels); y = G(x) (tanh, [-1, 1]);
result = -y repeated to 3 channels: sketch domain, background -1, lines +1, values in [-1, 1].
The side must be a multiple of 256 for the network; other sizes are edge-padded and cropped (see ``run_padded``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ._common import run_padded, uint8_to_unit

STRIDE = 256  # 2 ** 8 levels


class _Level(nn.Module):
    """One U-Net level; ``model`` holds its layers in the reference index order."""

    def __init__(self, in_ch: int, inner_ch: int, out_ch: int, inner: nn.Module | None, *, outermost: bool):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(in_ch, inner_ch, kernel_size=4, stride=2, padding=1, bias=True)
        up_in = inner_ch if inner is None else inner_ch * 2
        up = nn.ConvTranspose2d(up_in, out_ch, kernel_size=4, stride=2, padding=1, bias=True)
        if outermost:
            layers = [down, inner, nn.ReLU(), up, nn.Tanh()]
        elif inner is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, _instance_norm(out_ch)]
        else:
            layers = [nn.LeakyReLU(0.2), down, _instance_norm(inner_ch), inner, nn.ReLU(), up, _instance_norm(out_ch)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        layers = list(self.model)
        activated = layers[0](x)
        y = activated
        for layer in layers[1:]:
            y = layer(y)
        return torch.cat([activated, y], dim=1)


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class Anime2SketchNet(nn.Module):
    """G: (N, 3, H, W) in [-1, 1] -> (N, 1, H, W) in [-1, 1] (tanh); H, W multiples of 256."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, levels: int = 8, width: int = 64):
        super().__init__()
        # Channel width of each level's inner side, outermost first: 64, 128, 256, 512, 512, ...
        inner_widths = [min(width * 2 ** k, width * 8) for k in range(levels)]
        level: nn.Module | None = None
        for k in range(levels - 1, 0, -1):  # build from the innermost level outwards
            level = _Level(inner_widths[k - 1], inner_widths[k], inner_widths[k - 1], level, outermost=False)
        self.model = _Level(in_ch, inner_widths[0], out_ch, level, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_network() -> nn.Module:
    """The network with random weights, in eval mode (key layout of ``netG.pth`` without ``module.``)."""
    return Anime2SketchNet().eval()


def run(net: Callable[[torch.Tensor], torch.Tensor], rgb: np.ndarray, device: torch.device,
        dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 CPU sketch-domain tensor in [-1, 1]."""
    x = uint8_to_unit(rgb)
    x = (x - 0.5) / 0.5
    y = run_padded(net, x.to(device=device, dtype=dtype), STRIDE)
    y = y.float().clamp(-1, 1)
    return (-y).repeat(1, 3, 1, 1).cpu().contiguous()
