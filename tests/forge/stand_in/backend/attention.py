"""Stub of Forge's ``backend/attention.py``: ``attention_function(q, k, v, heads, mask)`` on (B, N, heads·d)."""
import torch


def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner)


attention_function = attention_pytorch
attention_xformers = None


def attention_function_single_head_spatial(q, k, v):
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(2, 3).reshape(b, c, h, w)


def get_attn_precision():
    return torch.float32
