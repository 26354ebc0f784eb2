"""The XL sketch encoder (``control_encoder.*``, the original's ``MultiScaleAttentionEncoder``; method-xl §4).

Keys (prefix ``control_encoder.`` stripped; released widths in brackets):

* ``model.{0,2,...,14}``: the stem of the SD2.1 encoder (3 -> 16, 16, 32 s2, 32, 96 s2, 96, 256 s2, C₀ = 320);
* ``downsample_layers.{0,1,2}.1``: SiLU + conv3x3, C₀ -> C₀ (s2), C₀ -> 2C₀ (s2), 2C₀ -> 4C₀ (s1);
* ``proj_ins.{0..4}``: conv1x1 of x₀, x₁, x₂, x₃ and of the global mean of x₃ to the attention width D = 4C₀;
* ``attn_layer.{to_q, to_k, to_v}`` (no bias), ``attn_layer.to_out.0``, ``attn_layer.{q_norm, k_norm}.weight``
  (RMSNorm over D);
* ``proj_outs.{0..3}``: conv1x1 from D back to C₀, C₀, 2C₀, 4C₀.

forward(sketch (B, 3, H, W) in the sketch domain) -> the four residuals
``[c₀ (B, C₀, H/8, W/8), c₁ (B, C₀, H/16, W/16), c₂ (B, 2C₀, H/32, W/32), c₃ (B, 4C₀, H/32, W/32)]``, added after
the U-Net's input blocks 0, 3, 6, 8 (:data:`lib_colorize.family.XL`).

The one attention layer sees the tokens ``T = [g, p₃, p₂, p₁, p₀]`` (coarse to fine), block-causally: the queries of
scale j attend to the keys of scales 0..j (the global token belongs to scale 0), with 2-D rotary positions on every
grid token, restarting at (0, 0) in each scale (:func:`rotary`). :data:`ROPE_MODES`: ``"rotation"`` is the true
rotation (what training used, presumably); ``"cos"`` is what the original app computes after its fp16 cast turned
the complex tables into their real parts (a scaling by cos, no rotation; method-xl §4, §12 #17). Until a comparison
with real weights settles it, both are offered (option ``sketch_rope``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sketch_encoder import STEM_CONV_INDICES, _LoadsFromStateDict, sketch_stem

ROPE_MODES = ("rotation", "cos")
#: θ of the rotary embedding (method-xl §4: θ_i = 10000^(-2i/64) for a head width of 128).
ROPE_THETA = 10000.0


@dataclass
class SketchEncoderXLConfig:
    """Widths of the XL sketch encoder. Defaults = released ``MultiScaleAttentionEncoder(3, 320, [1, 2, 4])``."""

    in_channels: int = 3
    stem_channels: Sequence[int] = (16, 16, 32, 32, 96, 96, 256, 320)
    level_channels: Sequence[int] = (320, 640, 1280)
    head_dim: int = 128

    @property
    def attention_dim(self) -> int:
        return int(self.level_channels[-1])

    @property
    def heads(self) -> int:
        return max(1, self.attention_dim // self.head_dim)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "SketchEncoderXLConfig":
        sd = state_dict
        stem = [int(sd[f"model.{i}.weight"].shape[0]) for i in STEM_CONV_INDICES]
        n_levels = len({k.split(".")[1] for k in sd if k.startswith("downsample_layers.")})
        levels = [int(sd[f"downsample_layers.{i}.1.weight"].shape[0]) for i in range(n_levels)]
        return cls(in_channels=int(sd["model.0.weight"].shape[1]), stem_channels=tuple(stem),
                   level_channels=tuple(levels))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · g`` over the last dimension, computed in float32 (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_angles(grid: Sequence[int], head_dim: int, device=None) -> torch.Tensor:
    """φ (h·w, head_dim/2) in float64: channel pair m < head_dim/4 turns by ``row·θ_m``, the others by
    ``col·θ_{m - head_dim/4}``; θ_i = 10000^(-2i / (head_dim/2)); tokens in raster order."""
    h, w = int(grid[0]), int(grid[1])
    quarter = head_dim // 4
    theta = ROPE_THETA ** (-torch.arange(0, 2 * quarter, 2, dtype=torch.float64, device=device) / (2 * quarter))
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    return torch.cat([rows[:, None] * theta[None], cols[:, None] * theta[None]], dim=1)


def rotary(x: torch.Tensor, grid: Sequence[int], mode: str = "rotation") -> torch.Tensor:
    """2-D rotary positions on x (B, heads, h·w, head_dim), channel pairs (2m, 2m+1) as complex z_m.

    ``rotation``: z_m ← z_m·e^{iφ_m}; ``cos``: z_m ← z_m·cos φ_m with cos rounded to float16 (the original app's
    table after its fp16 cast). Computed in float64, returned in x's dtype."""
    angles = rope_angles(grid, x.shape[-1], device=x.device)
    pairs = x.double().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if mode == "rotation":
        cos, sin = torch.cos(angles), torch.sin(angles)
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    elif mode == "cos":
        cos = torch.cos(angles).to(torch.float16).double()
        out = torch.stack([a * cos, b * cos], dim=-1)
    else:
        raise ValueError(f"rope mode must be one of {ROPE_MODES}, got {mode!r}")
    return out.flatten(-2).to(x.dtype)


class MultiScaleAttention(nn.Module):
    """The block-causal multi-scale self-attention (``attn_layer``; method-xl §4 step 4)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)

    def forward(self, tokens: torch.Tensor, grids: Sequence[Sequence[int]], rope: str = "rotation") -> torch.Tensor:
        """tokens (B, 1 + Σ hⱼwⱼ, D) = [g, scale 0, scale 1, ...]; ``grids`` (hⱼ, wⱼ) coarse to fine."""
        def heads_first(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # (B, heads, L, d)

        q = heads_first(self.q_norm(self.to_q(tokens)))
        k = heads_first(self.k_norm(self.to_k(tokens)))
        v = heads_first(self.to_v(tokens))
        # rotary positions on each scale's grid tokens (not on the global token), positions restarting per scale
        q_parts, k_parts, start = [q[:, :, :1]], [k[:, :, :1]], 1
        for grid in grids:
            end = start + int(grid[0]) * int(grid[1])
            q_parts.append(rotary(q[:, :, start:end], grid, rope))
            k_parts.append(rotary(k[:, :, start:end], grid, rope))
            start = end
        q, k = torch.cat(q_parts, dim=2), torch.cat(k_parts, dim=2)
        outputs, start = [], 0
        for j, grid in enumerate(grids):
            end = start + int(grid[0]) * int(grid[1]) + (j == 0)
            # scale j's queries attend to the keys of scales 0..j
            outputs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end]))
            start = end
        out = torch.cat(outputs, dim=2).transpose(1, 2).flatten(2)
        return self.to_out(out)


class SketchEncoderXL(_LoadsFromStateDict):
    """Sketch (B, 3, H, W) -> the four XL residuals (see the module docstring). ``rope``: :data:`ROPE_MODES`
    (``from_state_dict(sd, rope=...)``)."""

    config_class = SketchEncoderXLConfig

    def __init__(self, config: Optional[SketchEncoderXLConfig] = None, rope: str = "rotation"):
        super().__init__()
        config = SketchEncoderXLConfig() if config is None else config
        if rope not in ROPE_MODES:
            raise ValueError(f"rope mode must be one of {ROPE_MODES}, got {rope!r}")
        self.config = config
        self.rope = rope
        width = config.attention_dim
        self.model = sketch_stem(config.in_channels, config.stem_channels)
        c0 = config.stem_channels[-1]
        self.downsample_layers = nn.ModuleList()
        self.proj_ins = nn.ModuleList([nn.Conv2d(c0, width, 1)])
        self.proj_outs = nn.ModuleList([nn.Conv2d(width, c0, 1)])
        previous, last = c0, len(config.level_channels) - 1
        for i, channels in enumerate(config.level_channels):
            self.downsample_layers.append(nn.Sequential(
                nn.SiLU(), nn.Conv2d(previous, channels, 3, stride=2 if i != last else 1, padding=1)))
            self.proj_ins.append(nn.Conv2d(channels, width, 1))
            self.proj_outs.append(nn.Conv2d(width, channels, 1))
            previous = channels
        self.proj_ins.append(nn.Conv2d(width, width, 1))   # the global token
        self.attn_layer = MultiScaleAttention(width, config.heads, config.head_dim)

    def forward(self, sketch: torch.Tensor) -> List[torch.Tensor]:
        x = self.model(sketch.to(self.dtype))
        features = [x]
        for layer in self.downsample_layers:
            x = layer(x)
            features.append(x)
        # x₀..x₃ fine to coarse; tokens coarse to fine after the global token
        grids = [tuple(f.shape[-2:]) for f in features][::-1]
        tokens = [proj(f).flatten(2).transpose(1, 2) for proj, f in zip(self.proj_ins, features)]
        global_token = self.proj_ins[-1](x.mean(dim=(2, 3), keepdim=True)).flatten(2).transpose(1, 2)
        sequence = torch.cat([global_token] + tokens[::-1], dim=1)
        sequence = sequence + self.attn_layer(sequence, grids, self.rope)
        residuals, start = [], 1
        for grid, proj in zip(grids, reversed(self.proj_outs)):
            end = start + grid[0] * grid[1]
            part = sequence[:, start:end].transpose(1, 2).unflatten(-1, grid)
            residuals.append(proj(part))
            start = end
        return residuals[::-1]
