"""Softmax attention with its log-sum-exp, and the exact merge of attentions over two key sets, which makes
attention injection cheaper than the original for the same result.

Attention injection gives every reference-dropped row two self-attentions over the same queries (method §6.3):
the plain one over its own ``N`` tokens, and the injected one over ``[own ; bank]`` (``2N`` keys). The original
evaluates them separately, ``3N²`` query-key products per row and block. Softmax attention over a union of key
sets is the log-sum-exp-weighted mean of the attentions over each set,

    A(q, K₁ ∪ K₂) = w A(q, K₁) + (1 − w) A(q, K₂),    w = σ(L₁ − L₂),    Lᵢ = log Σ_{k ∈ Kᵢ} exp(q·k / √d),

so both follow from the two ``N``-key attentions (``2N²``), and the blend of method §6.3 becomes one weighted mean:

    φ A_own + (1 − φ) A_[own;bank] = a A_own + (1 − a) A_bank,    a = φ + (1 − φ) w.

The output projection ``to_out`` is affine, so blending before it equals blending its two outputs.

:func:`attention_with_lse` runs the fused kernel of the device when it returns the log-sum-exp (torch's flash or
memory-efficient attention, selected once per device, dtype and head width by comparing with the exact formula on
a small input) and otherwise the exact formula in query chunks. A fused kernel that still fails on a real shape is
replaced by the formula for that kind of input (out-of-memory errors propagate: the formula would need more).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import torch
from torch import nn

AttentionWithLSE = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]

_SCORE_CHUNK_ELEMENTS = 1 << 25   # query chunk of the exact formula: at most 32 M scores (128 MiB in float32)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact ``softmax(q kᵀ · scale) v`` and ``L = logsumexp(q kᵀ · scale)``, scores in float32.

    q (B, H, N, d), k and v (B, H, M, d) -> out (B, H, N, d) in q's dtype, lse (B, H, N) float32.
    Queries are processed in chunks so the score matrix stays bounded.
    """
    batch, heads, n, _ = q.shape
    m = k.shape[-2]
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * m))
    kt = k.float().transpose(-1, -2)
    vf = v.float()
    outs, lses = [], []
    for start in range(0, n, chunk):
        scores = (q[:, :, start:start + chunk].float() @ kt) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse.unsqueeze(-1)) @ vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _flash_for_cpu(q, k, v, scale):          # torch >= 2.2 on the CPU
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def _flash(q, k, v, scale):                  # CUDA (half precision); the CPU kernel in torch 2.1
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return result[0], result[1]


def _memory_efficient(q, k, v, scale):       # CUDA, torch >= 2.1; the lse may be padded along the queries
    result = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return result[0], result[1][..., :q.shape[-2]]


_FUSED_KERNELS: Tuple[Tuple[str, AttentionWithLSE], ...] = (
    ("flash_for_cpu", _flash_for_cpu), ("flash", _flash), ("memory_efficient", _memory_efficient))
_selected: dict = {}
_selected_lock = threading.Lock()


def _kernel_key(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple:
    return device.type, device.index, dtype, head_dim


def _agrees_with_math(kernel: AttentionWithLSE, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Does ``kernel`` give the exact formula's output and log-sum-exp on a small input of this kind?"""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 77, 3, head_dim)   # (B, N, H, d) transposed to (B, H, N, d): the layout attention modules pass
    q, k, v = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype).transpose(1, 2)
               for _ in range(3))
    scale = head_dim ** -0.5
    try:
        out, lse = kernel(q, k, v, scale)
    except Exception:   # not built for this device, dtype or head width, or another signature in this torch
        return False
    want_out, want_lse = attention_math(q, k, v, scale)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    return (out.shape == want_out.shape and lse.shape == want_lse.shape
            and bool(torch.allclose(out.float(), want_out.float(), atol=tolerance, rtol=tolerance))
            and bool(torch.allclose(lse.float(), want_lse, atol=tolerance, rtol=tolerance)))


def select_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> Tuple[str, AttentionWithLSE]:
    """The first fused kernel that agrees with :func:`attention_math` here, else the exact formula (cached)."""
    key = _kernel_key(device, dtype, head_dim)
    with _selected_lock:
        if key in _selected:
            return _selected[key]
    choice = ("math", attention_math)
    if device.type != "meta":   # meta tensors: count the formula's FLOPs (benchmark arithmetic)
        for name, kernel in _FUSED_KERNELS:
            if _agrees_with_math(kernel, device, dtype, head_dim):
                choice = (name, kernel)
                break
    with _selected_lock:
        _selected[key] = choice
    return choice


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scale) v`` and its log-sum-exp ``L`` (float32), q (B, H, N, d), k/v (B, H, M, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name, kernel = select_kernel(q.device, q.dtype, q.shape[-1])
    try:
        out, lse = kernel(q, k, v, scale)
    except RuntimeError as error:
        if name == "math" or "out of memory" in str(error).lower():
            raise
        # a shape the small selection input did not cover: use the exact formula from now on
        with _selected_lock:
            _selected[_kernel_key(q.device, q.dtype, q.shape[-1])] = ("math", attention_math)
        out, lse = attention_math(q, k, v, scale)
    return out, lse.float()


def union_weight(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """``w = σ(L_a − L_b)``: the share of key set A in the softmax over A ∪ B (float32, broadcast over d)."""
    return torch.sigmoid(lse_a - lse_b).unsqueeze(-1)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) -> (B, H, N, d)."""
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H·d)."""
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


def blended_self_attention(attn: nn.Module, hidden: torch.Tensor, bank: torch.Tensor,
                           reference_fidelity: float) -> torch.Tensor:
    """``φ · attn1(n) + (1 − φ) · attn1(n, [n ; bank])`` of method §6.3 from two N-key attentions.

    ``attn``: an ldm/sgm-style attention module (``heads``, ``to_q``, ``to_k``, ``to_v``, ``to_out``, optional
    ``scale``); ``hidden`` (B, N, C) the normalised hidden states of the reference-dropped rows; ``bank`` (B, N, C)
    their bank rows. With ``a = φ + (1 − φ) σ(L_own − L_bank)`` the result is ``to_out(a A_own + (1 − a) A_bank)``.
    """
    heads = int(attn.heads)
    bank = bank.to(hidden.dtype)
    q = split_heads(attn.to_q(hidden), heads)
    scale = getattr(attn, "scale", None) or q.shape[-1] ** -0.5
    own, lse_own = attention_with_lse(q, split_heads(attn.to_k(hidden), heads),
                                      split_heads(attn.to_v(hidden), heads), scale)
    phi = float(reference_fidelity)
    if phi >= 1.0:   # a = 1: plain self-attention only
        return attn.to_out(merge_heads(own))
    ref, lse_ref = attention_with_lse(q, split_heads(attn.to_k(bank), heads),
                                      split_heads(attn.to_v(bank), heads), scale)
    a = phi + (1.0 - phi) * union_weight(lse_own, lse_ref)
    mixed = (a * own.float() + (1.0 - a) * ref.float()).to(hidden.dtype)
    return attn.to_out(merge_heads(mixed))
