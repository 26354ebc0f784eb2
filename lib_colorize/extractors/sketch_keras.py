"""``lineart_keras`` (the original app's default): SketchKeras, method §8.2; weights ``model.pth`` of
tellurion/line_extractor (stored locally as ``sketchKeras.pth``).

Network (one channel in, one out; every conv is preceded by reflection padding and followed by BatchNorm
eps 1e-3 and ReLU, except the last conv):

  downblock_1: pad1, conv3 1->32                                          (.1 conv, .2 BN)
  downblock_2..4: pad1, conv4/2 c->2c, BN, ReLU, pad1, conv3 2c->2c      (.1/.5 conv, .2/.6 BN); 32->64->128->256
  downblock_5: pad1, conv4/2 256->512                                     (.1 conv, .2 BN)
  downblock_6: pad1, conv3 512->512                                       (.1 conv, .2 BN)
  upblock_k (k=1..4): bicubic x2, pad(1,2,1,2), conv4 -> BN, ReLU, pad1, conv3  (.2/.6 conv, .3/.7 BN)
      on cat(skip, previous): 1024->512->256, 512->256->128, 256->128->64, 128->64->32
      (skips: d5 with d6, then d4, d3, d2)
  last_pad + last_conv: pad1, conv3 on cat(d1, u4) 64->1 (no activation)

Total stride 16: the side must be a multiple of 16; other sizes are edge-padded and cropped.

Processing (``proceed`` in the original), on the uint8 RGB image:
  hp = img - GaussianBlur(img, sigma=3) in integer arithmetic (both uint8, difference in int), then float32 / 127.5,
  then divided by its global maximum (over all pixels and channels). The three channels run as a batch of three
  one-channel images; p = max over the batch; p[p < 0.1] = 0; result = (p - 0.5) * 2 repeated to 3 channels.
  Sketch domain: background -1, lines +1. The network is unbounded above, so the original can exceed +1 on strong
  lines; this implementation clamps the result to [-1, 1] (the documented range of every extractor). A flat image
  (global maximum <= 0, where the original divides by zero) is left undivided.
The network may run in fp16 on CUDA; the post-processing always runs in float32.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
import torch
from torch import nn

from ._common import run_padded

STRIDE = 16
BLUR_SIGMA = 3.0
THRESHOLD = 0.1


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.0)


def _pad_conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, pad=(1, 1, 1, 1)) -> list[nn.Module]:
    return [nn.ReflectionPad2d(pad), nn.Conv2d(cin, cout, kernel_size=k, stride=stride), _bn(cout), nn.ReLU()]


def _down(cin: int, cout: int, *, strided: bool, second: bool) -> nn.Sequential:
    layers = _pad_conv_bn_relu(cin, cout, 4 if strided else 3, stride=2 if strided else 1)
    if second:
        layers += _pad_conv_bn_relu(cout, cout, 3)
    return nn.Sequential(*layers)


def _up(cin: int, cmid: int, cout: int) -> nn.Sequential:
    layers = [nn.Upsample(scale_factor=2, mode="bicubic")]
    layers += _pad_conv_bn_relu(cin, cmid, 4, pad=(1, 2, 1, 2))
    layers += _pad_conv_bn_relu(cmid, cout, 3)
    return nn.Sequential(*layers)


class SketchKerasNet(nn.Module):
    """(N, 1, H, W) normalised high-pass image -> (N, 1, H, W) line probability (about [0, 1], unbounded)."""

    def __init__(self):
        super().__init__()
        self.downblock_1 = _down(1, 32, strided=False, second=False)
        self.downblock_2 = _down(32, 64, strided=True, second=True)
        self.downblock_3 = _down(64, 128, strided=True, second=True)
        self.downblock_4 = _down(128, 256, strided=True, second=True)
        self.downblock_5 = _down(256, 512, strided=True, second=False)
        self.downblock_6 = _down(512, 512, strided=False, second=False)
        self.upblock_1 = _up(1024, 512, 256)
        self.upblock_2 = _up(512, 256, 128)
        self.upblock_3 = _up(256, 128, 64)
        self.upblock_4 = _up(128, 64, 32)
        self.last_pad = nn.ReflectionPad2d((1, 1, 1, 1))
        self.last_conv = nn.Conv2d(64, 1, kernel_size=3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.downblock_1(x)
        d2 = self.downblock_2(d1)
        d3 = self.downblock_3(d2)
        d4 = self.downblock_4(d3)
        d5 = self.downblock_5(d4)
        d6 = self.downblock_6(d5)
        u = self.upblock_1(torch.cat((d5, d6), dim=1))
        u = self.upblock_2(torch.cat((d4, u), dim=1))
        u = self.upblock_3(torch.cat((d3, u), dim=1))
        u = self.upblock_4(torch.cat((d2, u), dim=1))
        return self.last_conv(self.last_pad(torch.cat((d1, u), dim=1)))


def build_network() -> nn.Module:
    """The network with random weights, in eval mode (key layout of tellurion/line_extractor ``model.pth``)."""
    return SketchKerasNet().eval()


def high_pass(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 network input: (img - blur(img)) / 127.5 / global max (see module docstring)."""
    img = np.asarray(rgb, dtype=np.uint8)
    blurred = cv2.GaussianBlur(img, (0, 0), BLUR_SIGMA)
    hp = (img.astype(np.int64) - blurred.astype(np.int64)).astype(np.float32) / 127.5
    peak = float(hp.max())
    if peak > 0:
        hp /= peak
    return hp


def postprocess(pred: torch.Tensor) -> torch.Tensor:
    """(3, 1, H, W) network output -> (1, 3, H, W) float32 sketch-domain tensor in [-1, 1]."""
    p = pred.float().amax(dim=0)  # (1, H, W)
    p = torch.where(p < THRESHOLD, torch.zeros_like(p), p)
    p = ((p - 0.5) * 2).clamp(-1, 1)
    return p.unsqueeze(1).repeat(1, 3, 1, 1)


def run(net: Callable[[torch.Tensor], torch.Tensor], rgb: np.ndarray, device: torch.device,
        dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 CPU sketch-domain tensor in [-1, 1]."""
    x = torch.from_numpy(high_pass(rgb)).permute(2, 0, 1).unsqueeze(1)  # (3, 1, H, W): channels as a batch
    pred = run_padded(net, x.to(device=device, dtype=dtype), STRIDE)
    return postprocess(pred).cpu().contiguous()
