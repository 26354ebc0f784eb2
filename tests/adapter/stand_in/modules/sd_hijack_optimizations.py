"""Stand-in ``modules.sd_hijack_optimizations``: the cross-attention optimisations, applied as the webui applies
them, by replacing ``ldm.modules.attention.CrossAttention.forward`` on the class.

Each replacement has ldm's signature plus ``**kwargs`` (``forward(self, x, context=None, mask=None, **kwargs)``) and
uses the module's ``to_q``/``to_k``/``to_v``/``to_out``, ``heads`` and ``scale``, so forward hooks and pre-hooks on
the attention modules and on ``to_out[0]`` run exactly as around ldm's own forward:

* ``scaled_dot_product_attention_forward`` ("sdp"): ``torch.nn.functional.scaled_dot_product_attention`` on
  (b, heads, n, d), then ``to_out[0]`` and ``to_out[1]`` called one after the other;
* ``split_cross_attention_forward_invokeAI`` ("InvokeAI", the webui's choice on a CPU without CUDA): the scores
  ``q (k * scale)^T`` computed and soft-maxed in slices of query rows (``SPLIT_QUERY_ROWS`` per slice here, small
  so that the tiny test models really run in several slices).

"None" restores ldm's own forward. ``modules.sd_hijack.apply_optimizations`` picks one (setting
``cross_attention_optimization``: "Automatic" = the available one with the highest priority, as in the webui).
"""
import torch

import ldm.modules.attention
from ldm.util import default
from modules import shared

SPLIT_QUERY_ROWS = 16


class SdOptimization:
    name = None
    label = None
    cmd_opt = None
    priority = 0

    def title(self):
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self):
        return True

    def apply(self):
        raise NotImplementedError

    def undo(self):
        from modules import sd_hijack

        ldm.modules.attention.CrossAttention.forward = sd_hijack.attention_CrossAttention_forward


class SdOptimizationSdp(SdOptimization):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 70

    def is_available(self):
        return hasattr(torch.nn.functional, "scaled_dot_product_attention")

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward


class SdOptimizationInvokeAI(SdOptimization):
    name = "InvokeAI"
    cmd_opt = "opt_split_attention_invokeai"

    @property
    def priority(self):
        return 1000 if shared.device.type != "mps" and not torch.cuda.is_available() else 10

    def apply(self):
        ldm.modules.attention.CrossAttention.forward = split_cross_attention_forward_invokeAI


def list_optimizers(res):
    res.extend([SdOptimizationSdp(), SdOptimizationInvokeAI()])


def _project(self, x, context):
    context = default(context, x)
    return self.to_q(x), self.to_k(context), self.to_v(context)


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch, _, _ = x.shape
    h = self.heads
    q, k, v = (t.reshape(batch, t.shape[1], h, t.shape[2] // h).transpose(1, 2) for t in _project(self, x, context))
    attn_mask = None
    if mask is not None:
        attn_mask = mask.reshape(batch, 1, 1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                                           is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(q.dtype)
    out = self.to_out[0](out)
    return self.to_out[1](out)


def split_cross_attention_forward_invokeAI(self, x, context=None, mask=None, **kwargs):
    h = self.heads
    q, k, v = _project(self, x, context)
    dtype = q.dtype
    k = k * self.scale
    q, k, v = (t.reshape(t.shape[0], t.shape[1], h, t.shape[2] // h).permute(0, 2, 1, 3).flatten(0, 1)
               for t in (q, k, v))
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=q.dtype)
    for start in range(0, q.shape[1], SPLIT_QUERY_ROWS):
        end = start + SPLIT_QUERY_ROWS
        scores = torch.einsum("b i d, b j d -> b i j", q[:, start:end], k)
        out[:, start:end] = torch.einsum("b i j, b j d -> b i d", scores.softmax(dim=-1, dtype=scores.dtype), v)
    out = out.to(dtype)
    out = out.reshape(-1, h, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).flatten(2)
    return self.to_out(out)
