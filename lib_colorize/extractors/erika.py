"""``lineart_denoise``: manga line extractor "Erika" (``res_skip``), method §8.2; weights ``erika.pth``
(lllyasviel/Annotators).

Network: a residual encoder-decoder on one channel in [0, 255] producing one channel in about [0, 255]. Every
convolution is pre-activated: BatchNorm (eps 1e-3) -> LeakyReLU 0.2 -> conv (``<unit>.model.{0,2}``), the upsampling
unit appends a nearest x2 upsample. A residual block is ``conv1`` (3x3, maybe stride 2 or followed by x2 upsample),
``residual`` (3x3) and a ``shortcut`` that adds its input, through a 1x1 conv (``shortcut.model.0``) when the channel
count or resolution changes. Stages (``blockN.model.<i>``):

  encoder   block0: 1->24 x2 (no stride)   block1: 24->48 x3   block2: 48->96 x5   block3: 96->192 x7
            block4: 192->384 x12   (the last block of stages 1..4 has stride 2: total stride 16)
  decoder   block5: 384->192 x7   block6: 192->96 x5   block7: 96->48 x3   block8: 48->24 x2
            (the first block of each upsamples x2; the skip sums res1..res4 add block3..block0 outputs, no weights)
  head      block9: 24->16 x2 (no stride), conv15: BN/LeakyReLU/1x1 conv 16->1

Processing (``proceed`` in the original): input = R channel of to_tensor(img) * 255 (one channel, [0, 255]);
y = net(input); result = -(clamp(y, 0, 255) / 127.5 - 1) repeated to 3 channels: sketch domain, background
(white paper, y ~ 255) -1, lines +1, values in [-1, 1]. The side must be a multiple of 16; other sizes are
edge-padded and cropped.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ._common import run_padded, uint8_to_unit

STRIDE = 16

#: (stage name, in channels, out channels, blocks, kind); kind: "down" (last block strided), "flat", "up"
STAGES = (
    ("block0", 1, 24, 2, "flat"),
    ("block1", 24, 48, 3, "down"),
    ("block2", 48, 96, 5, "down"),
    ("block3", 96, 192, 7, "down"),
    ("block4", 192, 384, 12, "down"),
    ("block5", 384, 192, 7, "up"),
    ("block6", 192, 96, 5, "up"),
    ("block7", 96, 48, 3, "up"),
    ("block8", 48, 24, 2, "up"),
    ("block9", 24, 16, 2, "flat"),
)


class _Unit(nn.Module):
    """BN -> LeakyReLU -> conv (k x k, 'same' padding) [-> nearest x2 upsample]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        layers = [nn.BatchNorm2d(cin, eps=1e-3), nn.LeakyReLU(0.2),
                  nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Add(nn.Module):
    """x + y, with x projected by a 1x1 conv (``model.0``) [and upsampled] when the shapes differ."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        if cin != cout or stride != 1:
            layers = [nn.Conv2d(cin, cout, 1, stride=stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)
        else:
            self.model = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x if self.model is None else self.model(x)) + y


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = _Unit(cin, cout, 3, stride=stride, upsample=upsample)
        self.residual = _Unit(cout, cout, 3)
        # In every upsampling block the channel count changes, so its shortcut always has the projection.
        self.shortcut = _Add(cin, cout, stride=stride, upsample=upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x, self.residual(self.conv1(x)))


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, kind: str):
        super().__init__()
        layers = []
        for i in range(blocks):
            first = i == 0
            stride = 2 if kind == "down" and i == blocks - 1 else 1
            upsample = kind == "up" and first
            layers.append(_Block(cin if first else cout, cout, stride=stride, upsample=upsample))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ErikaNet(nn.Module):
    """(N, 1, H, W) in [0, 255] -> (N, 1, H, W) raw line map (white ~255, lines ~0); H, W multiples of 16."""

    def __init__(self):
        super().__init__()
        for name, cin, cout, blocks, kind in STAGES:
            self.add_module(name, _Stage(cin, cout, blocks, kind))
        for i, ch in enumerate((192, 96, 48, 24), start=1):
            self.add_module(f"res{i}", _Add(ch, ch))
        self.conv15 = _Unit(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.block0(x)
        x1 = self.block1(x0)
        x2 = self.block2(x1)
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        y = self.res1(x3, self.block5(x4))
        y = self.res2(x2, self.block6(y))
        y = self.res3(x1, self.block7(y))
        y = self.res4(x0, self.block8(y))
        return self.conv15(self.block9(y))


def build_network() -> nn.Module:
    """The network with random weights, in eval mode (key layout of ``erika.pth`` without ``module.``)."""
    return ErikaNet().eval()


def run(net: Callable[[torch.Tensor], torch.Tensor], rgb: np.ndarray, device: torch.device,
        dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 CPU sketch-domain tensor in [-1, 1]."""
    x = uint8_to_unit(rgb)[:, :1] * 255  # R channel only, as the original (not a grey conversion)
    y = run_padded(net, x.to(device=device, dtype=dtype), STRIDE).float()
    y = y.clamp(0, 255) / 127.5 - 1.0
    return (-y).repeat(1, 3, 1, 1).cpu().contiguous()
