"""The extra modules of v1.5 (``switch``) and v2 checkpoints, with the released names (method-enhance §2, §3).

==============================  ==========================================  ===========================================
module                          checkpoint prefix                           what it computes
==============================  ==========================================  ===========================================
:class:`SplitLoRA`              ``model.diffusion_model.<T>...attn2.to_*``  low-rank fg/bg deltas of attn2 q/k/v (§3.2)
:class:`ThresholdEmbedder`      ``thresh_embedder.``                        ``e(τ)`` of the mask thresholds (v1.5, §3.1)
:class:`ClusterTransformer`     ``transformer.``                            background tokens ``G = CT(X)`` (v1.5, §3.4)
:class:`WarpBlock` × 12         ``model.diffusion_model.warp_modules.j.``   ``Warp_j(skip, hs_bg[j])`` (v2, §3.6)
:class:`StyleModule` × 12       ``model.diffusion_model.style_modules.j.``  ``(γ, β)`` from ``M_j + P_j(emb_t)`` (v2, §3.6)
:class:`UNetEncoder` × 2        ``bg_encoder.`` / ``style_encoder.``        12 hints: token maps / vectors (v2, §3.5)
==============================  ==========================================  ===========================================

Every class builds from a state dict's own shapes (``from_state_dict``), so a file whose shapes do not fit is
refused by :func:`lib_colorize.checkpoint.load_enhance_modules` with the key named. Nothing here is ever merged
into the U-Net's weights: the LoRA stays separate low-rank tensors, applied by a processor
(:mod:`lib_colorize.processors.enhance`) when a mode asks for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .unet import (CrossAttention, UNetConfig, build_input_blocks, num_heads_for, time_embedding,
                   timestep_embedding)

#: Width of the size / threshold sinusoids (``TimestepEmbedding(256)``, method-enhance §3.1).
SINUSOID_DIM = 256


def scalar_sinusoid(values: torch.Tensor, dim: int = SINUSOID_DIM) -> torch.Tensor:
    """``σ_dim(r) = [cos(r f_k), sin(r f_k)]``, ``f_k = exp(−ln(10⁴)·k/(dim/2))``: (N,) -> (N, dim), float32."""
    return timestep_embedding(values.float(), dim)


def size_embedding(image_hw: Sequence[int], target_hw: Sequence[int]) -> torch.Tensor:
    """v2's size embedding ``y(x; H, W)`` (method-enhance §3.1): (1, 512) float32.

    ``image_hw``: the tensor size (h_x, w_x) of the reference or background (after pad-with-margin);
    ``target_hw``: the output size (H, W). When the image is smaller than the output on either side,
    ``h' = h_x + max(H, W)`` and ``w' = w_x·h'/h_x``; else ``(h', w') = (h_x, w_x)``. Then
    ``y = [σ₂₅₆(h'/H), σ₂₅₆(w'/W)]``.
    """
    hx, wx = float(image_hw[0]), float(image_hw[1])
    height, width = float(target_hw[0]), float(target_hw[1])
    if hx < height or wx < width:
        h_prime = hx + max(height, width)
        w_prime = wx / hx * h_prime
    else:
        h_prime, w_prime = hx, wx
    ratios = torch.tensor([h_prime / height, w_prime / width], dtype=torch.float32)
    return scalar_sinusoid(ratios).reshape(1, 2 * SINUSOID_DIM)


# --------------------------------------------------------------------------------------------------- LoRA
class LowRank(nn.Module):
    """``λ · U(D(x))`` of one side of a split LoRA linear (``lora_down_<side>``, ``lora_up_<side>``; no biases)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


class SplitLoRA(nn.Module):
    """The fg and bg low-rank pairs of one attn2 linear (``SplitLoraInjectedLinear`` without the base weight).

    ``delta(x, side)`` = ``U_side(D_side(x))`` (λ = 1 at inference, method-enhance §3.2). State-dict keys:
    ``lora_down_fg.weight``, ``lora_up_fg.weight``, ``lora_down_bg.weight``, ``lora_up_bg.weight``.
    """

    SIDES = ("fg", "bg")

    def __init__(self, in_features: int, out_features: int, ranks: Mapping[str, int]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sides = nn.ModuleDict({side: LowRank(in_features, out_features, ranks[side]) for side in self.SIDES})

    def delta(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return self.sides[side](x)

    @staticmethod
    def stored_key(side: str, part: str) -> str:
        """Checkpoint key suffix of ``part`` ∈ {down, up} of ``side``."""
        return f"lora_{part}_{side}.weight"

    def load_stored(self, tensors: Mapping[str, torch.Tensor]) -> None:
        state = {f"sides.{side}.{part}.weight": tensors[self.stored_key(side, part)]
                 for side in self.SIDES for part in ("down", "up")}
        self.load_state_dict(state, strict=True, assign=True)


#: ``<T>.transformer_blocks.<d>.attn2.<proj>.lora_<part>_<side>.weight`` under ``model.diffusion_model.``
LORA_KEY = re.compile(r"^(?P<attn>.+\.attn2)\.(?P<proj>to_q|to_k|to_v)\.lora_(?P<part>down|up)_(?P<side>fg|bg)\.weight$")
LORA_PROJECTIONS = ("to_q", "to_k", "to_v")


class AttentionLoRA(nn.Module):
    """The split LoRA of one attn2 module: ``to_q``, ``to_k``, ``to_v`` (each a :class:`SplitLoRA`)."""

    def __init__(self, shapes: Mapping[str, tuple]):
        """``shapes``: proj -> (in_features, out_features, {"fg": rank, "bg": rank})."""
        super().__init__()
        self.projections = nn.ModuleDict({proj: SplitLoRA(*shapes[proj]) for proj in LORA_PROJECTIONS})


# ------------------------------------------------------------------------------------ threshold embedding
class ThresholdEmbedder(nn.Module):
    """v1.5 ``thresh_embedder``: ``e(τ) = W₂·SiLU(W₁·σ(τ) + b₁) + b₂`` (method-enhance §3.1).

    forward(τ (N,)) -> (N, 1, out) in float32: the sinusoid width is ``embed_layer.0``'s input width.
    """

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.embed_layer = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, object]) -> "ThresholdEmbedder":
        out_dim, embed_dim = shapes["embed_layer.0.weight"].shape
        return cls(int(embed_dim), int(out_dim))

    def forward(self, thresholds: torch.Tensor) -> torch.Tensor:
        layer = self.embed_layer[0]
        emb = scalar_sinusoid(thresholds.reshape(-1), self.embed_dim).to(layer.weight.device, layer.weight.dtype)
        return self.embed_layer(emb.unsqueeze(1))


# --------------------------------------------------------------------------------------- ClusterTransformer
class ClusterTransformer(nn.Module):
    """v1.5 ``transformer``: ``G = CT(X)`` (method-enhance §3.4).

    Queries start from the learned ``embedding`` (L, C); per layer ``q ← q + Attn(LN₁(q), X)`` (keys/values
    from X unnormalised, C/64 heads, ``to_out`` with bias) and ``q ← q + MLP(LN₂(q))`` (Linear C→4C, SiLU, Linear
    4C→C). forward(X (B, N, C)) -> (B, L, C).
    """

    def __init__(self, dim: int, token_length: int, layers: int, mlp_ratio: int = 4):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(token_length, dim))
        heads = num_heads_for(dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim), CrossAttention(dim, dim, heads, dim // heads),
                           nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.SiLU(), nn.Linear(dim * mlp_ratio, dim))])
            for _ in range(layers)])

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, object]) -> "ClusterTransformer":
        token_length, dim = shapes["embedding"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
        mlp = shapes["layers.0.3.0.weight"].shape[0] // dim
        return cls(int(dim), int(token_length), layers, int(mlp))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.embedding.dtype)
        q = self.embedding.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for norm1, norm2, attention, mlp in self.layers:
            q = q + attention(norm1(q), context=tokens)
            q = q + mlp(norm2(q))
        return q


# ------------------------------------------------------------------------------------- warp / style modules
class WarpBlock(nn.Module):
    """v2 ``warp_modules[j]`` (``SelfTransformerBlock(ich)``, method-enhance §3.6).

    ``Warp(x, T)``: x (B, C, H, W) to tokens; ``x ← x + Attn(LN₁(x), T)`` (C/64 heads, keys/values from T
    unnormalised); ``x ← x + FF(LN₂(x))`` with FF = Linear(C, 4C), SiLU, Linear(4C, C); back to (B, C, H, W).
    """

    def __init__(self, channels: int, mlp_ratio: int = 4):
        super().__init__()
        heads = num_heads_for(channels)
        self.attn = CrossAttention(channels, channels, heads, channels // heads)
        self.ff = nn.Sequential(nn.Linear(channels, channels * mlp_ratio), nn.SiLU(),
                                nn.Linear(channels * mlp_ratio, channels))
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)

    @property
    def channels(self) -> int:
        return self.norm1.weight.shape[0]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t), context=tokens.to(t.dtype))
        t = t + self.ff(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class StyleModule(nn.ModuleList):
    """v2 ``style_modules[j]`` = [LN_j, P_j, Z_j] (method-enhance §3.6): ``s = M_j + P_j(emb_t)``,
    ``(γ, β) = split(Z_j(LN_j(s)))`` (B, ch, 1, 1) each."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__([nn.LayerNorm(width), nn.Linear(emb_dim, width), nn.Linear(width, width)])

    def scale_shift(self, modulation: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm, project_emb, project_style = self
        dtype = project_emb.weight.dtype
        s = modulation.to(dtype) + project_emb(emb.to(dtype))
        gamma, beta = project_style(norm(s))[..., None, None].chunk(2, dim=1)
        return gamma, beta


# -------------------------------------------------------------------------------------------- UNetEncoder
class UNetEncoder(nn.Module):
    """v2 ``bg_encoder`` / ``style_encoder`` (method-enhance §3.5).

    ``emb = time_embed(σ₃₂₀(t)) + label_emb(y)``; ``h`` through the 12 SD input blocks (cross-attention on
    ``context``); after block i a hint: bg ``tokens(Conv1×1_i(h_i))`` (B, H_i·W_i, C_i), style
    ``Linear_i(mean_{H,W}(h_i))`` (B, D_i). Returned reversed: entry j = hint of input block 11 − j.
    ``time_embed`` runs in its own dtype (fp32 in the app), the rest in the blocks' dtype.
    """

    def __init__(self, config: UNetConfig, style: bool, label_dim: int, hint_widths: Sequence[int]):
        super().__init__()
        self.config = config
        self.style = style
        emb_dim = config.time_embed_dim
        self.time_embed = time_embedding(config)
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(label_dim, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))
        self.input_blocks, widths = build_input_blocks(config)
        self.zero_layers = nn.ModuleList(
            [nn.Linear(c, d) if style else nn.Conv2d(c, c, 1) for c, d in zip(widths, hint_widths)])

    @staticmethod
    def hint_widths(config: UNetConfig, style: bool) -> tuple[int, ...]:
        """Zero-layer output widths: bg ``C_i``; style ``2·C_i``, ``min(8·mc, 4·C_i)`` after a downsample block."""
        blocks, widths = build_input_blocks_shapes(config)
        if not style:
            return widths
        mc = config.model_channels
        return tuple(min(8 * mc, 4 * c) if down else 2 * c for c, down in zip(widths, blocks))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, object], style: bool) -> "UNetEncoder":
        """``shapes``: key -> anything with ``.shape`` and ``.dim()`` (tensors or header views)."""
        config = UNetConfig.from_state_dict({k: v for k, v in shapes.items()
                                             if k.startswith(("input_blocks.", "time_embed."))})
        label_dim = int(shapes["label_emb.0.0.weight"].shape[1])
        return cls(config, style, label_dim, cls.hint_widths(config, style))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, context: torch.Tensor,
                timestep: float = 0.0) -> list:
        t = torch.full((x.shape[0],), float(timestep), device=x.device)
        time_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(time_dtype)).to(self.dtype)
        emb = emb + self.label_emb(y.to(device=x.device, dtype=self.dtype))
        h = x.to(self.dtype)
        context = context.to(self.dtype)
        hints = []
        for zero_layer, block in zip(self.zero_layers, self.input_blocks):
            h = block(h, emb, context)
            if self.style:
                hints.append(zero_layer(h.mean(dim=(2, 3))))
            else:
                hints.append(zero_layer(h).flatten(2).transpose(1, 2))
        hints.reverse()
        return hints


def build_input_blocks_shapes(config: UNetConfig) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """(is-downsample, width) of each input block of ``config``, without building modules."""
    downs, widths = [False], [config.model_channels]
    ch = config.model_channels
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            ch = mult * config.model_channels
            downs.append(False)
            widths.append(ch)
        if level != len(config.channel_mult) - 1:
            downs.append(True)
            widths.append(ch)
    return tuple(downs), tuple(widths)


# ------------------------------------------------------------------------------------------- the bundle
@dataclass
class EnhanceModules:
    """The extra modules of one checkpoint that a generation needs (None: not loaded / not in the file).

    ``lora``: attn2 module name in the U-Net (``input_blocks.1.1.transformer_blocks.0.attn2``) -> its LoRA.
    """

    version: str
    path: str = ""
    lora: Dict[str, AttentionLoRA] = field(default_factory=dict)
    thresh_embedder: Optional[ThresholdEmbedder] = None
    cluster_transformer: Optional[ClusterTransformer] = None
    warp_modules: Optional[nn.ModuleList] = None
    style_modules: Optional[nn.ModuleList] = None
    bg_encoder: Optional[UNetEncoder] = None
    style_encoder: Optional[UNetEncoder] = None

    def modules(self) -> list:
        found = [m for m in (self.thresh_embedder, self.cluster_transformer, self.warp_modules, self.style_modules,
                             self.bg_encoder, self.style_encoder) if m is not None]
        return found + list(self.lora.values())

    def to(self, device=None, dtype: Optional[torch.dtype] = None, keep_fp32: bool = True) -> "EnhanceModules":
        """Move to ``device``/``dtype``; the tiny v1.5 modules and the encoders' ``time_embed`` stay in float32
        (method-enhance §10.1)."""
        for module in self.modules():
            module.to(device=device)
            if dtype is not None:
                module.to(dtype=dtype)
        if keep_fp32:
            for module in (self.thresh_embedder, self.cluster_transformer):
                if module is not None:
                    module.float()
            for encoder in (self.bg_encoder, self.style_encoder):
                if encoder is not None:
                    encoder.time_embed.float()
        return self


__all__ = ["SINUSOID_DIM", "scalar_sinusoid", "size_embedding", "LowRank", "SplitLoRA", "AttentionLoRA",
           "LORA_KEY", "LORA_PROJECTIONS", "ThresholdEmbedder", "ClusterTransformer", "WarpBlock", "StyleModule",
           "UNetEncoder", "EnhanceModules", "build_input_blocks_shapes"]
