"""Stand-in ``ldm.modules.attention``: ``CrossAttention``, ``BasicTransformerBlock``, ``SpatialTransformer``.

The structure our hooks meet in the webui: ``SpatialTransformer.transformer_blocks[i]`` is a
``BasicTransformerBlock`` with ``attn1`` (self-attention, called ``attn1(norm1(x), context=None)``), ``attn2``
(cross-attention, ``attn2(norm2(x), context=context)``), ``ff``, ``norm1..3`` and ``checkpoint``; each
``CrossAttention`` has ``to_q``, ``to_k``, ``to_v``, ``to_out = [Linear, Dropout]``, ``heads`` and ``scale``.
``CrossAttention.forward(self, x, context=None, mask=None)`` is ldm's plain attention; the webui replaces it at the
class level with an optimised kernel (``modules/sd_hijack_optimizations.py``), and so does the stand-in.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint
from ldm.util import default, exists


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, default(dim_out, dim)))

    def forward(self, x):
        return self.net(x)


def zero_module(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def _heads_first(t, h):
    """(b, n, h*d) -> (b*h, n, d)."""
    b, n, inner = t.shape
    return t.reshape(b, n, h, inner // h).permute(0, 2, 1, 3).reshape(b * h, n, inner // h)


def _heads_last(t, h):
    """(b*h, n, d) -> (b, n, h*d)."""
    bh, n, d = t.shape
    return t.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        """softmax(q k^T * scale) v per head, the scores in float32 (ldm's ``_ATTN_PRECISION = "fp32"``);
        ``mask`` (b, m) bool keeps the keys where True."""
        h = self.heads
        context = default(context, x)
        q, k, v = (_heads_first(t, h) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        sim = torch.bmm(q.float(), k.float().transpose(1, 2)) * self.scale
        if exists(mask):
            keep = mask.reshape(mask.shape[0], -1).repeat_interleave(h, dim=0)[:, None, :]
            sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
        out = torch.bmm(sim.softmax(dim=-1).to(v.dtype), v)
        return self.to_out(_heads_last(out, h))


class BasicTransformerBlock(nn.Module):
    # the webui maps "softmax-xformers" to CrossAttention too (modules/sd_hijack.py); no xformers here
    ATTENTION_MODES = {"softmax": CrossAttention, "softmax-xformers": CrossAttention}

    def __init__(self, dim, n_heads, d_head, dropout=0., context_dim=None, gated_ff=True, checkpoint=True,
                 disable_self_attn=False):
        super().__init__()
        attn_cls = self.ATTENTION_MODES["softmax"]
        self.disable_self_attn = disable_self_attn
        self.attn1 = attn_cls(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                              context_dim=context_dim if self.disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = attn_cls(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                              dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm -> ``proj_in`` (1x1 conv, or Linear on the tokens with ``use_linear``) -> transformer blocks on
    (b, h*w, c) tokens -> ``proj_out``, plus the input."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0., context_dim=None,
                 disable_self_attn=False, use_linear=False, use_checkpoint=True):
        super().__init__()
        if exists(context_dim) and not isinstance(context_dim, list):
            context_dim = [context_dim]
        context_dim = context_dim if exists(context_dim) else [None] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                   disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
             for d in range(depth)])
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[i])
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
