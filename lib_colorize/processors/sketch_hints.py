"""Sketch hints: the sketch encoder's features added to the outputs of input blocks 0, 3, 6, 9 and 11 (method §3; the
XL models: 0, 3, 6 and 8, method-xl §2.3 -- the family's ``hint_blocks``).

``h_i ← h_i + k_ctl · hint_i``, before the skip connection stores ``h_i`` (ldm's U-Net appends each input block's
output to ``hs`` as it is, so a forward hook that returns the sum changes the skip too). The hints of a call
(already times the sketch strength ``k_ctl``) come from :attr:`UNetCall.sketch_hints`.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import HINT_BLOCKS, CurrentCall, Processor


class SketchHints(Processor):
    """Adds the call's hint of each level to its input block's output (``blocks``: which input blocks)."""

    def __init__(self, blocks: Sequence[int] = HINT_BLOCKS):
        self.blocks = tuple(blocks)

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        input_blocks = unet.input_blocks
        if len(input_blocks) <= max(self.blocks):
            raise ValueError(f"U-Net has {len(input_blocks)} input blocks; hints need {max(self.blocks) + 1}")
        return [input_blocks[block].register_forward_hook(self._hook(level, current))
                for level, block in enumerate(self.blocks)]

    @staticmethod
    def _hook(level: int, current: CurrentCall):
        def add_hint(module, inputs, output):
            call = current()
            if call is None or call.sketch_hints is None or call.sketch_hints[level] is None:
                return None
            hint = call.sketch_hints[level].to(device=output.device, dtype=output.dtype)
            if hint.shape[-2:] != output.shape[-2:]:
                # the webui runs the U-Net at sizes that are multiples of 8, not 64 (TorchHijackForUnet)
                hint = F.interpolate(hint, size=output.shape[-2:], mode="nearest")
            if hint.shape[0] not in (1, output.shape[0]):
                raise RuntimeError(f"ColorizeDiffusion: sketch hints for {hint.shape[0]} rows but the U-Net call "
                                   f"has {output.shape[0]} rows")
            return output + hint

        return add_hint
