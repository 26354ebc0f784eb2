"""open_clip's transformer blocks evaluated batch-first from their parts (method §1.5).

open_clip changed the tensor layout of its ``Transformer`` in 2.26 (sequence-first before, batch-first after).
Every residual block is therefore evaluated from its parts (:func:`residual_block`): the token-wise parts
(``ln_1``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) are called on batch-first tensors, and the attention is computed
from the packed ``in_proj``/``out_proj`` parameters. Nothing depends on open_clip's layout, so the results are the
same on open-clip-torch 2.20 (what A1111 pins) and 3.x.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _check_attention(attn: nn.Module) -> None:
    """Accept only the plain packed-projection ``nn.MultiheadAttention`` that open_clip's CLIP blocks use."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"unsupported open_clip attention module {type(attn).__name__}")
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("unsupported nn.MultiheadAttention configuration (separate q/k/v, bias_kv or zero_attn)")


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head self-attention from the parameters of ``attn``; x (B, L, D) -> (B, L, D).

    [q|k|v] = x W_in^T + b_in (W_in (3D, D) packed as q, k, v); per head h (width d = D/H):
    o_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h; out = concat_h(o_h) W_out^T + b_out.
    ``mask``: additive float (L, L) (-inf = blocked) or None.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(b, n, d)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


def residual_block(block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` on batch-first x (B, L, D):

    x = x + ls_1(attn(ln_1(x), mask)); x = x + ls_2(mlp(ln_2(x))), mlp = c_proj(gelu(c_fc(.))).
    ln/ls/mlp are token-wise modules (layout-free); the attention is :func:`self_attention`.
    """
    x = x + block.ls_1(self_attention(block.attn, block.ln_1(x), mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def check_transformer(transformer: nn.Module) -> None:
    """Fail early on blocks this module does not compute (cosine attention, cross-attention blocks, ...)."""
    for block in transformer.resblocks:
        for name in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
            if not hasattr(block, name):
                raise ValueError(f"unsupported open_clip residual block {type(block).__name__} (no {name})")
        if hasattr(block, "ln_attn"):
            raise ValueError(f"unsupported open_clip residual block {type(block).__name__} (ln_attn)")
        _check_attention(block.attn)


def run_transformer(transformer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All ``transformer.resblocks`` in order on batch-first x (B, L, D) (method §2.2: all layers, no early exit)."""
    for block in transformer.resblocks:
        x = residual_block(block, x, mask)
    return x


def causal_mask(n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask (n, n): 0 on and below the diagonal, -inf above (open_clip text tower)."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)
