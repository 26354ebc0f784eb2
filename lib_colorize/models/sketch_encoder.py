"""Sketch encoder (``control_encoder.*``, original ``MultiEncoder``; method §3).

Keys (checkpoint prefix ``control_encoder.`` stripped):

* ``model.{0,2,...,14}``: stem of eight conv3x3, SiLU between them (modules 1, 3, ..., 13), none after ``model.14``;
  stride 2 at ``model.4``, ``model.8``, ``model.12`` (f = 8 overall).
* ``zero_layer.0``: conv1x1 -> hint 0.
* ``output_blocks.i``: [SiLU, conv3x3 (``.1``, stride 2 unless last), SiLU, conv3x3 (``.3``)], sequential.
* ``zero_blocks.i.0``: conv1x1 -> hint i+1.

Widths are inferred from the weights (released: stem 16,16,32,32,96,96,256,320; c = [320, 640, 1280, 1280]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..randomness import untouched_global_rng

# Stem conv indices inside ``model`` and which of them have stride 2 (method §3 table).
STEM_CONV_INDICES = (0, 2, 4, 6, 8, 10, 12, 14)
STEM_STRIDE2_INDICES = (4, 8, 12)


@dataclass
class SketchEncoderConfig:
    """Widths of the sketch encoder. Defaults = released ``MultiEncoder(3, 320, [1, 2, 4, 4])`` (method §3)."""

    in_channels: int = 3
    stem_channels: Sequence[int] = (16, 16, 32, 32, 96, 96, 256, 320)
    hint_channels: Sequence[int] = (320, 640, 1280, 1280)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "SketchEncoderConfig":
        """Infer widths from tensors named as in the checkpoint without ``control_encoder.``."""
        sd = state_dict
        stem = [int(sd[f"model.{i}.weight"].shape[0]) for i in STEM_CONV_INDICES]
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("output_blocks.")})
        hints = [int(sd[f"output_blocks.{i}.3.weight"].shape[0]) for i in range(n_blocks)]
        return cls(in_channels=int(sd["model.0.weight"].shape[1]), stem_channels=tuple(stem),
                   hint_channels=tuple(hints))


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


def conv1x1(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1, padding=0)


def sketch_stem(in_channels: int, stem_channels: Sequence[int]) -> nn.Sequential:
    """``model``: eight conv3x3 with SiLU between them, stride 2 at ``model.4/8/12`` (f = 8), no activation after
    the last (method §3; the XL encoder's stem is the same, method-xl §4 step 1)."""
    layers: List[nn.Module] = []
    c_prev = in_channels
    for n, (index, c_out) in enumerate(zip(STEM_CONV_INDICES, stem_channels)):
        if n:
            layers.append(nn.SiLU())
        layers.append(conv3x3(c_prev, c_out, stride=2 if index in STEM_STRIDE2_INDICES else 1))
        c_prev = c_out
    return nn.Sequential(*layers)


class _LoadsFromStateDict(nn.Module):
    """``from_state_dict`` (widths inferred by ``config_class``, tensors' dtype kept) and ``dtype``."""

    config_class: type = None

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], strict: bool = True, **kwargs):
        """Build with widths inferred from ``state_dict`` and load it (keeps the tensors' dtype)."""
        with untouched_global_rng():   # the new layers' initial weights come from the global RNG
            model = cls(cls.config_class.from_state_dict(state_dict), **kwargs)
        model.load_state_dict(state_dict, strict=strict)
        return model.to(state_dict["model.0.weight"].dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.model[0].weight.dtype


class SketchEncoder(_LoadsFromStateDict):
    """Sketch (B, 3, H, W) in the sketch domain -> five hints (method §3), with h = H/8, w = W/8:

    (B, c0_stem_out, h, w), (B, c0, h/2, w/2), (B, c1, h/4, w/4), (B, c2, h/8, w/8), (B, c3, h/8, w/8)
    (released: 320, 320, 640, 1280, 1280 channels). They are added after U-Net input blocks 0, 3, 6, 9, 11.
    """

    def __init__(self, config: Optional[SketchEncoderConfig] = None):
        super().__init__()
        config = SketchEncoderConfig() if config is None else config
        self.config = config
        self.model = sketch_stem(config.in_channels, config.stem_channels)
        c_prev = config.stem_channels[-1]
        self.zero_layer = nn.Sequential(conv1x1(c_prev))

        last = len(config.hint_channels) - 1
        self.output_blocks = nn.ModuleList()
        self.zero_blocks = nn.ModuleList()
        for i, c in enumerate(config.hint_channels):
            self.output_blocks.append(nn.Sequential(
                nn.SiLU(), conv3x3(c_prev, c, stride=2 if i != last else 1), nn.SiLU(), conv3x3(c, c)
            ))
            self.zero_blocks.append(nn.Sequential(conv1x1(c)))
            c_prev = c

    def forward(self, sketch: torch.Tensor) -> List[torch.Tensor]:
        x = self.model(sketch.to(self.dtype))
        hints = [self.zero_layer(x)]
        for block, zero_conv in zip(self.output_blocks, self.zero_blocks):
            x = block(x)
            hints.append(zero_conv(x))
        return hints


SketchEncoder.config_class = SketchEncoderConfig
