"""IS-Net (DIS, Qin et al. 2022) as the mask extractors use it (method-enhance §4.2): ``ISNet-sketch`` and ``ISNet``.

The network is the published IS-Net: a stride-2 input convolution, six encoder stages of residual U-blocks
(RSU-L: an L-level U-Net of conv-BN-ReLU units inside a residual connection; RSU-4F replaces the pooling by
dilations 1, 2, 4, 8), 2×2 ceil-mode max-pooling between stages, five decoder stages on the upsampled previous
stage concatenated with the encoder stage of the same size, and 3×3 side convolutions; only ``side1``
(upsampled to the input size, then ``sigmoid``) is the mask. Parameter names follow the released files
(``conv_in``, ``stage1`` … ``stage6``, ``stage5d`` … ``stage1d``, ``side1`` … ``side6``; a unit is ``conv_s1`` +
``bn_s1``). Widths are read from a state dict (:meth:`ISNet.from_state_dict`), so small test networks in the
same layout load too.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: stage -> (RSU depth L, dilated "F" variant). Encoder stages 1-6, decoder stages 5d-1d.
STAGES: Dict[str, Tuple[int, bool]] = {
    "stage1": (7, False), "stage2": (6, False), "stage3": (5, False), "stage4": (4, False),
    "stage5": (4, True), "stage6": (4, True),
    "stage5d": (4, True), "stage4d": (4, False), "stage3d": (5, False), "stage2d": (6, False), "stage1d": (7, False),
}
#: Released widths: stage -> (in, mid, out); ``conv_in`` 3 -> 64.
RELEASED_WIDTHS: Dict[str, Tuple[int, int, int]] = {
    "stage1": (64, 32, 64), "stage2": (64, 32, 128), "stage3": (128, 64, 256), "stage4": (256, 128, 512),
    "stage5": (512, 256, 512), "stage6": (512, 256, 512),
    "stage5d": (1024, 256, 512), "stage4d": (1024, 128, 256), "stage3d": (512, 64, 128), "stage2d": (256, 32, 64),
    "stage1d": (128, 16, 64),
}
#: side convolution -> the stage whose output it reads
SIDES = {"side1": "stage1d", "side2": "stage2d", "side3": "stage3d", "side4": "stage4d", "side5": "stage5d",
         "side6": "stage6"}


class ConvUnit(nn.Module):
    """3×3 convolution (dilation d, padding d), BatchNorm, ReLU (``conv_s1``, ``bn_s1``)."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


def upsample_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``target``'s spatial size (align_corners False)."""
    return F.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block of depth ``L`` (``rebnconvin``, ``rebnconv1..L``, ``rebnconv(L-1)d..1d``).

    Plain: units 1..L-1 at dilation 1 with a pooling after each of 1..L-2, unit L at dilation 2, the decoder
    upsampling back level by level. Dilated ("F"): no pooling, units 1..L at dilations 1, 2, 4, ..., decoder
    units at the dilations of the level they join. Output ``decoder + rebnconvin(x)``.
    """

    def __init__(self, depth: int, c_in: int, mid: int, c_out: int, dilated: bool = False):
        super().__init__()
        self.depth, self.dilated = depth, dilated
        self.rebnconvin = ConvUnit(c_in, c_out)
        dilations = [2 ** k for k in range(depth)] if dilated else [1] * (depth - 1) + [2]
        for level in range(1, depth + 1):
            setattr(self, f"rebnconv{level}", ConvUnit(c_out if level == 1 else mid, mid, dilations[level - 1]))
        for level in range(depth - 1, 0, -1):
            setattr(self, f"rebnconv{level}d", ConvUnit(2 * mid, c_out if level == 1 else mid,
                                                       dilations[level - 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hin = self.rebnconvin(x)
        encoded = []
        h = hin
        for level in range(1, self.depth + 1):
            if level > 1 and not self.dilated and level < self.depth:
                h = _pool(h)
            h = getattr(self, f"rebnconv{level}")(h)
            encoded.append(h)
        d = encoded[-1]
        for level in range(self.depth - 1, 0, -1):
            skip = encoded[level - 1]
            if d.shape[2:] != skip.shape[2:]:
                d = upsample_like(d, skip)
            d = getattr(self, f"rebnconv{level}d")(torch.cat([d, skip], dim=1))
        return d + hin


class ISNet(nn.Module):
    """IS-Net; forward(x (B, 3, S, S)) -> ``sigmoid(side1)`` (B, 1, S, S)."""

    def __init__(self, widths: Mapping[str, Tuple[int, int, int]] = RELEASED_WIDTHS, stem: int = 64):
        super().__init__()
        self.conv_in = nn.Conv2d(3, stem, 3, stride=2, padding=1)
        for name, (depth, dilated) in STAGES.items():
            setattr(self, name, RSU(depth, *widths[name], dilated=dilated))
        for side, stage in SIDES.items():
            setattr(self, side, nn.Conv2d(widths[stage][2], 1, 3, padding=1))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ISNet":
        """Widths from the stored shapes (the stage layout is IS-Net's)."""
        widths = {}
        for name in STAGES:
            out_c, in_c = state[f"{name}.rebnconvin.conv_s1.weight"].shape[:2]
            mid = state[f"{name}.rebnconv1.conv_s1.weight"].shape[0]
            widths[name] = (int(in_c), int(mid), int(out_c))
        return cls(widths, stem=int(state["conv_in.weight"].shape[0]))

    @staticmethod
    def scaled_widths(divisor: int) -> Dict[str, Tuple[int, int, int]]:
        """The released widths divided by ``divisor`` (small networks for tests)."""
        return {name: tuple(max(1, w // divisor) for w in widths) for name, widths in RELEASED_WIDTHS.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.stage1(self.conv_in(x))
        h2 = self.stage2(_pool(h1))
        h3 = self.stage3(_pool(h2))
        h4 = self.stage4(_pool(h3))
        h5 = self.stage5(_pool(h4))
        h6 = self.stage6(_pool(h5))
        d = self.stage5d(torch.cat([upsample_like(h6, h5), h5], dim=1))
        d = self.stage4d(torch.cat([upsample_like(d, h4), h4], dim=1))
        d = self.stage3d(torch.cat([upsample_like(d, h3), h3], dim=1))
        d = self.stage2d(torch.cat([upsample_like(d, h2), h2], dim=1))
        d = self.stage1d(torch.cat([upsample_like(d, h1), h1], dim=1))
        return torch.sigmoid(upsample_like(self.side1(d), x))
