"""Cross-attention scale: ``attn2`` of transformer block ``i`` contributes ``s_i · Attn(...)`` (method §4.2).

The scale multiplies the attention result before the output projection ``to_out[0]``, so its bias is not scaled
(``s_i = 0`` leaves exactly the bias). The scales of a generation come from
:func:`lib_colorize.guidance.cross_attention_scales` (reference strength, level scales or the 16 layer scales);
they are the same in every call, so this processor reads no per-call plan.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import CurrentCall, Processor, transformer_blocks


class CrossAttentionScale(Processor):
    """``s_i`` on every transformer block whose scale is not 1 (blocks at 1 get no hook at all)."""

    def __init__(self, scales: Sequence[float]):
        self.scales = [float(s) for s in scales]

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        blocks = transformer_blocks(unet)
        if len(self.scales) != len(blocks):
            raise ValueError(f"{len(self.scales)} layer scales for {len(blocks)} transformer blocks")
        return [block.attn2.to_out[0].register_forward_pre_hook(self._hook(scale))
                for block, scale in zip(blocks, self.scales) if scale != 1.0]

    @staticmethod
    def _hook(scale: float):
        def scale_attention(module, args):
            return (args[0] * scale,) + tuple(args[1:])

        return scale_attention
