"""SD-2.x- and SDXL-layout U-Nets with ldm/sgm module names (method §1.1, §3, §4; method-xl §1.5, §2).

The module tree reproduces ldm's ``openaimodel.UNetModel`` naming exactly, so the released
``model.diffusion_model.*`` tensors (prefix stripped) load with ``strict=True``:

* ``time_embed.{0,2}``; ``label_emb.0.{0,2}`` (XL: the ``y`` embedding); ``input_blocks.N``;
  ``middle_block.{0,1,2}``; ``output_blocks.N``; ``out.{0,2}``
* ResBlock: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``
* SpatialTransformer: ``norm``, ``proj_in``, ``transformer_blocks.{0..depth-1}``, ``proj_out``
* BasicTransformerBlock: ``attn1``, ``attn2``, ``ff.net.0.proj``, ``ff.net.2``, ``norm1/2/3`` (no ``attn2``/``norm2``
  in xlv2's ReferenceNet, method-xl §6.2)
* CrossAttention: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``
* Downsample ``op``; Upsample ``conv``

The released models use 1x1-conv ``proj_in``/``proj_out`` (method §1.1, "difference from SD2.1"); Linear
projections (SD 2.x ``use_linear_in_transformer``, SDXL) are supported too. The SDXL layout (method-xl §2.1) is
the same tree with three levels, attention on levels 1-2 with depths 2 and 10 (middle 10) and a ``label_emb`` for the
512-wide ``y``; xlv2's ReferenceNet is that tree without cross-attention, with 7 output blocks and no ``out``.
Dimensions are inferred from the weights (:meth:`UNetConfig.from_state_dict`).

Contract relied on by the processors of :mod:`lib_colorize.processors` (method §3, §4.2, §6):

* ``UNetModel.forward`` is the plain ldm loop: each input block's output is appended to ``hs`` as-is, so a forward
  hook on ``input_blocks[i]`` that returns a modified tensor changes the skip connection too.
* ``BasicTransformerBlock.forward`` calls ``self.attn1(self.norm1(x), context=None)`` and
  ``self.attn2(self.norm2(x), context=context)`` (context as keyword).
* ``CrossAttention`` applies its output projection as the module ``to_out[0]`` (pre-hooks there scale the
  attention output before the projection, method §4.2).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import merge_heads, split_heads

# Head width of SD 2.x (``num_head_channels: 64``, method §1.1).
HEAD_CHANNELS = 64


def num_heads_for(channels: int, head_channels: int = HEAD_CHANNELS) -> int:
    """Attention heads for a block of ``channels`` (method §4.1: C/64; at least one for tiny test models)."""
    return max(1, channels // head_channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (method §1.1): (B,) float timesteps (fractional allowed) -> (B, dim) as [cos, sin].

    freq_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1; computed in float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups (ldm ``normalization``; method §4.4)."""
    return nn.GroupNorm(32, channels, eps=eps, affine=True)


# ---------------------------------------------------------------------------------------------------------------------
# Attention


class CrossAttention(nn.Module):
    """Multi-head attention without biases on q/k/v (method §4.2).

    forward(x (B, N, query_dim), context (B, M, context_dim) or None) -> (B, N, query_dim).
    ``context=None`` means self-attention. Scores use the default 1/sqrt(head_dim) scale.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over heads: (B, N, inner), (B, M, inner) x2 -> (B, N, inner)."""
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return merge_heads(F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        out = self.attend(self.to_q(x), self.to_k(context), self.to_v(context))
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU input layer of the feed-forward: (…, dim) -> (…, dim_out) via ``proj`` to 2*dim_out."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width 4*dim (``net.0.proj``, ``net.2``; method §4.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU FF; pre-LayerNorm residuals (method §4.2).

    forward(x (B, N, dim), context (B, M, context_dim)) -> (B, N, dim). ``cross_attention=False`` (xlv2's
    ReferenceNet, method-xl §6.2): no ``attn2``/``norm2``, the context is ignored.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: Optional[int] = None,
                 cross_attention: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        if cross_attention:
            self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        if cross_attention:
            self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context=None)
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context=context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm(eps 1e-6) -> proj_in -> transformer blocks on (B, h*w, C) tokens -> proj_out, plus residual.

    ``use_linear=False`` (released models, method §1.1): proj_in/proj_out are 1x1 Conv2d applied on the feature map;
    ``use_linear=True`` (SD 2.x): Linear applied on the tokens.
    forward(x (B, C, h, w), context (B, M, context_dim)) -> (B, C, h, w).
    """

    def __init__(self, channels: int, n_heads: int, d_head: int, depth: int = 1,
                 context_dim: Optional[int] = None, use_linear: bool = False, cross_attention: bool = True):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim,
                                   cross_attention=cross_attention) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


# ---------------------------------------------------------------------------------------------------------------------
# Convolutional blocks


class TimestepBlock(nn.Module):
    """Marker base class: modules whose forward takes (x, emb)."""


class ResBlock(TimestepBlock):
    """ldm ResBlock (method §4.4): GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-Dropout-conv, + skip.

    forward(x (B, C_in, h, w), emb (B, emb_dim)) -> (B, C_out, h, w).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.channels = channels
        self.out_channels = out_channels
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb.to(self.emb_layers[1].weight.dtype)).to(h.dtype)
        h = h + emb_out[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """conv3x3 stride 2 (``op``): (B, C, h, w) -> (B, C, h/2, w/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """nearest x2 then conv3x3 (``conv``): (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Config


_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT_BLOCK = re.compile(r"^output_blocks\.(\d+)\.")


@dataclass
class UNetConfig:
    """Dimensions of an SD-2.x- or SDXL-layout U-Net (method §1.1, method-xl §2.1). Defaults = released
    ColorizeDiffusion (v1) U-Net; :data:`SDXL_UNET` is the XL one.

    ``attention_levels``: indices of channel_mult levels whose blocks carry a SpatialTransformer (SD2: ds 1, 2, 4
    = ``attention_resolutions [4,2,1]`` -> levels 0, 1, 2; SDXL: levels 1, 2). The middle block always has one.
    ``transformer_depth``: blocks per SpatialTransformer, one number or one per level (SDXL ``[1, 2, 10]``);
    ``middle_depth``: the middle block's (default: the last level's). ``adm_in_channels``: width of ``y`` for
    ``label_emb`` (None: no ``label_emb``). ``cross_attention=False``, ``num_output_blocks`` and
    ``final_layer=False`` describe xlv2's ReferenceNet (method-xl §6.2).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: Sequence[int] = (0, 1, 2)
    context_dim: int = 1024
    transformer_depth: "int | Sequence[int]" = 1
    use_linear_proj: bool = False
    head_channels: int = HEAD_CHANNELS
    middle_depth: Optional[int] = None
    adm_in_channels: Optional[int] = None
    cross_attention: bool = True
    num_output_blocks: Optional[int] = None
    final_layer: bool = True

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def depth_at(self, level: int) -> int:
        """SpatialTransformer depth of the input/output blocks of ``level``."""
        depth = self.transformer_depth
        return int(depth) if isinstance(depth, int) else int(depth[level])

    @property
    def middle_transformer_depth(self) -> int:
        if self.middle_depth is not None:
            return int(self.middle_depth)
        return self.depth_at(len(self.channel_mult) - 1)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "UNetConfig":
        """Infer the config from U-Net tensors named as in ldm (without ``model.diffusion_model.``).

        Only shapes are read: works on real tensors and on anything with ``.shape`` (e.g. header metadata).
        Raises KeyError/ValueError when the keys do not describe an SD-layout U-Net.
        """
        sd = state_dict
        conv_in = sd["input_blocks.0.0.weight"]
        in_channels, model_channels = int(conv_in.shape[1]), int(conv_in.shape[0])
        out_channels = int(sd["out.2.weight"].shape[0]) if "out.2.weight" in sd else in_channels

        block_ids = sorted({int(m.group(1)) for k in sd for m in [_INPUT_BLOCK.match(k)] if m})
        levels: list = [[]]  # per level: output channels of its ResBlocks
        attention_levels = set()
        depths: dict = {}  # level -> transformer depth of its first attention block
        for idx in block_ids:
            if idx == 0:
                continue
            prefix = f"input_blocks.{idx}."
            if prefix + "0.op.weight" in sd:
                levels.append([])
                continue
            levels[-1].append(int(sd[prefix + "0.out_layers.3.weight"].shape[0]))
            if prefix + "1.norm.weight" in sd:
                attention_levels.add(len(levels) - 1)
                depths.setdefault(len(levels) - 1, _depth_of(sd, prefix + "1."))
        if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
            raise ValueError("input blocks do not form an SD U-Net layout (unequal ResBlocks per level)")
        channel_mult = []
        for lv in levels:
            if lv[0] % model_channels:
                raise ValueError(f"level width {lv[0]} is not a multiple of model_channels {model_channels}")
            channel_mult.append(lv[0] // model_channels)

        # the middle block's transformer; an encoder-only tree (v2's UNetEncoder) has none: its first one
        transformer = "middle_block.1" if "middle_block.1.proj_in.weight" in sd else next(
            (f"input_blocks.{i}.1" for i in block_ids if f"input_blocks.{i}.1.proj_in.weight" in sd), None)
        if transformer is None:
            raise KeyError("middle_block.1.proj_in.weight")
        proj_in = sd[f"{transformer}.proj_in.weight"]
        use_linear = proj_in.dim() == 2 if hasattr(proj_in, "dim") else len(proj_in.shape) == 2
        cross_key = f"{transformer}.transformer_blocks.0.attn2.to_k.weight"
        cross_attention = cross_key in sd
        context_dim = int(sd[cross_key].shape[1]) if cross_attention else None
        middle_depth = _depth_of(sd, f"{transformer}.")
        per_level = tuple(depths.get(level, 1) for level in range(len(channel_mult)))
        uniform = len(set(depths.values()) | {middle_depth}) == 1
        label = sd.get("label_emb.0.0.weight")
        output_ids = {int(m.group(1)) for k in sd for m in [_OUTPUT_BLOCK.match(k)] if m}
        full_outputs = len(channel_mult) * (len(levels[0]) + 1)
        num_outputs = max(output_ids) + 1 if output_ids else 0
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=len(levels[0]),
            attention_levels=tuple(sorted(attention_levels)),
            context_dim=context_dim,
            transformer_depth=middle_depth if uniform else per_level,
            use_linear_proj=bool(use_linear),
            middle_depth=None if uniform else middle_depth,
            adm_in_channels=int(label.shape[1]) if label is not None else None,
            cross_attention=cross_attention,
            num_output_blocks=None if num_outputs == full_outputs else num_outputs,
            final_layer=any(k.startswith("out.") for k in sd),
        )


def _depth_of(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``transformer_blocks`` of the SpatialTransformer at ``prefix`` (e.g. ``middle_block.1.``)."""
    start = prefix + "transformer_blocks."
    return max(int(k[len(start):].split(".")[0]) for k in sd if k.startswith(start)) + 1


#: The SDXL U-Net of ColorizeDiffusion XL (method-xl §1.1: SDXL base with ``adm_in_channels 512``).
SDXL_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                       context_dim=2048, transformer_depth=(1, 2, 10), use_linear_proj=True, adm_in_channels=512)


# ---------------------------------------------------------------------------------------------------------------------
# U-Net


def time_embedding(config: UNetConfig) -> nn.Sequential:
    """``time_embed``: Linear(mc, 4mc), SiLU, Linear(4mc, 4mc) (method §1.1)."""
    mc, emb_dim = config.model_channels, config.time_embed_dim
    return nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def transformer_factory(config: UNetConfig):
    """``(channels, depth) -> SpatialTransformer`` with the config's heads (C/64), context width, projection and
    cross-attention (none in xlv2's ReferenceNet)."""
    def transformer(ch: int, depth: int) -> SpatialTransformer:
        heads = num_heads_for(ch, config.head_channels)
        return SpatialTransformer(ch, heads, ch // heads, depth=depth, context_dim=config.context_dim,
                                  use_linear=config.use_linear_proj, cross_attention=config.cross_attention)

    return transformer


def build_input_blocks(config: UNetConfig) -> tuple[nn.ModuleList, tuple[int, ...]]:
    """The SD ``input_blocks`` (shared by the U-Net and v2's UNetEncoders, method-enhance §3.5) and the width of
    each block's output (the skip widths), in block order."""
    mc, emb_dim = config.model_channels, config.time_embed_dim
    transformer = transformer_factory(config)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
    widths = [mc]
    ch = mc
    last_level = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers = [ResBlock(ch, emb_dim, mult * mc)]
            ch = mult * mc
            if level in config.attention_levels:
                layers.append(transformer(ch, config.depth_at(level)))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != last_level:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
    return blocks, tuple(widths)


class UNetModel(nn.Module):
    """ldm/sgm ``UNetModel`` (spatial transformers; a ``label_emb`` for ``y`` when ``adm_in_channels`` is set).

    forward(x (B, in_ch, h, w), timesteps (B,) float in [0, 999], context (B, M, context_dim), y (B, adm) or None)
    -> (B, out_ch, h, w); ``emb = time_embed(E(t)) + label_emb(y)`` (method-xl §2.2).
    h and w must be divisible by 2^(len(channel_mult)-1) (8 for the released SD2.1 models, method §8.4; 4 for XL).
    Without ``final_layer`` (ReferenceNet) the output is the last output block's features.
    """

    def __init__(self, config: Optional[UNetConfig] = None):
        super().__init__()
        config = UNetConfig() if config is None else config
        self.config = config
        mc, emb_dim = config.model_channels, config.time_embed_dim
        self.model_channels = mc

        self.time_embed = time_embedding(config)
        if config.adm_in_channels is not None:
            # sgm's ``num_classes: sequential``: label_emb.0 = Linear, SiLU, Linear
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))
        transformer = transformer_factory(config)
        self.input_blocks, skip_channels = build_input_blocks(config)
        skip_channels = list(skip_channels)
        ch = skip_channels[-1]

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim), transformer(ch, config.middle_transformer_depth), ResBlock(ch, emb_dim))

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                if config.num_output_blocks is not None and len(self.output_blocks) == config.num_output_blocks:
                    break
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if level in config.attention_levels:
                    layers.append(transformer(ch, config.depth_at(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        if config.final_layer:
            self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> "UNetModel":
        """Build with dimensions inferred from ``state_dict`` and load it (dtype of the tensors is kept)."""
        model = cls(UNetConfig.from_state_dict(state_dict))
        model.load_state_dict(state_dict, strict=strict)
        dtype = state_dict["input_blocks.0.0.weight"].dtype
        return model.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the block weights (``input_blocks``); time_embed/out may differ (method §4.4)."""
        return self.input_blocks[0][0].weight.dtype

    def transformer_blocks(self) -> list:
        """The BasicTransformerBlocks in DFS order (method §4.1: 16 blocks for the released layout)."""
        return [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float32, device=x.device)
        if timesteps.dim() == 0 or timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("this U-Net embeds a y vector (label_emb) and needs y")
            label = self.label_emb[0][0].weight
            emb = emb + self.label_emb(y.to(device=label.device, dtype=label.dtype)).to(emb.dtype)
        if context is not None:
            context = context.to(self.dtype)

        hs = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context)
        if not hasattr(self, "out"):
            return h
        h = h.to(self.out[0].weight.dtype)
        return self.out(h).to(x.dtype)
