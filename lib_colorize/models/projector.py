"""The XL reference projector (``proj.*``, the original's ``ClusterConcat``; method-xl §3.4).

Keys (prefix ``proj.`` stripped): ``attn.{to_q, to_k, to_v}`` (no bias), ``attn.to_out.0``; ``norm`` (LayerNorm of
the CLIP width); ``proj.0`` Linear(CLIP width + WD width -> 2048), ``proj.2`` Linear(2048 -> 2048), ``proj.3``
LayerNorm(2048).

forward(clip_tokens (B, 257, 1280), wd_tokens (B, 196, 1024)) -> context (B, 196, 2048):

    e = LN₂( W₂ SiLU(W₁ [ LN₁( Attn(c)[:, :196] ) ‖ w ] ) ),

``Attn`` a plain multi-head self-attention over all CLIP tokens (heads of 128, no residual), of which the first 196
outputs are kept (the class token's position and the first 195 patch positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .unet import CrossAttention


@dataclass
class ProjectorConfig:
    """Widths of ``ClusterConcat`` (released: CLIP 1280, WD 1024, output 2048, heads of 128, 196 tokens)."""

    clip_dim: int = 1280
    wd_dim: int = 1024
    output_dim: int = 2048
    head_dim: int = 128
    tokens: int = 196

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "ProjectorConfig":
        clip_dim = int(state_dict["norm.weight"].shape[0])
        out_dim, cat_dim = (int(s) for s in state_dict["proj.0.weight"].shape)
        return cls(clip_dim=clip_dim, wd_dim=cat_dim - clip_dim, output_dim=out_dim)


class ClusterConcat(nn.Module):
    """CLIP tokens + WD tokens -> the 196 context tokens of the U-Net (see the module docstring)."""

    def __init__(self, config: Optional[ProjectorConfig] = None):
        super().__init__()
        config = ProjectorConfig() if config is None else config
        if config.clip_dim < config.head_dim:
            raise ValueError(f"the CLIP width {config.clip_dim} is below one head of {config.head_dim}")
        self.config = config
        heads = config.clip_dim // config.head_dim
        self.attn = CrossAttention(config.clip_dim, None, heads=heads, dim_head=config.head_dim)
        self.norm = nn.LayerNorm(config.clip_dim)
        self.proj = nn.Sequential(nn.Linear(config.clip_dim + config.wd_dim, config.output_dim), nn.SiLU(),
                                  nn.Linear(config.output_dim, config.output_dim), nn.LayerNorm(config.output_dim))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> "ClusterConcat":
        model = cls(ProjectorConfig.from_state_dict(state_dict))
        model.load_state_dict(state_dict, strict=strict)
        return model.to(state_dict["norm.weight"].dtype)

    def forward(self, clip_tokens: torch.Tensor, wd_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.norm.weight.dtype
        x = self.attn(clip_tokens.to(dtype))[:, :self.config.tokens]
        x = torch.cat([self.norm(x), wd_tokens.to(dtype)], dim=2)
        return self.proj(x)
