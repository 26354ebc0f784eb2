"""xlv2's ReferenceNet attention control (method-xl §6.2-6.3): the ReferenceNet writes banks, the U-Net reads them.

* :class:`ReferenceNetBankWrite` on the ReferenceNet (``bg_encoder``): in its one pass per generation, the input of
  ``attn1`` (the normalised hidden states ``a = LN₁x``) of each of its 36 decoder transformer blocks is kept
  (:class:`ReferenceNetBanks`, (1, N_ℓ, C_ℓ) each).
* :class:`ReferenceNetBankRead` on the U-Net's 36 decoder transformer blocks (#34-69), paired with the writer's in
  depth-first order: while a call's plan carries a :class:`ReferenceNetRead`, self-attention splits its queries by
  the sketch mask ``m`` resized to the block's grid (bicubic, not clamped): where ``m > 0.05`` a query attends to
  its own tokens (the block's plain self-attention, the module's own call), elsewhere only to the bank
  (``module.forward(x, context=bank)``, a second ordinary attention, run in the hook). This is the original's
  masked attention over ``[a ‖ bank]`` with an additive ``-inf`` bias (§6.3), as two attentions and a select,
  without the (B, heads, N, 2N) bias tensor. The threshold is the original's fixed 0.05 of ``attn1`` (not the
  sketch-mask threshold of the cross-attention, §12 #6).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import CurrentCall, Processor

#: the original's threshold of the reader self-attention (``attn1``'s default ``mask_threshold``)
READER_THRESHOLD = 0.05


def decoder_transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks (``attn1`` and ``ff``) under ``output_blocks``, depth-first: 36 in the SDXL
    layout, in the U-Net (with cross-attention) and in the ReferenceNet (without) alike."""
    return [m for m in net.output_blocks.modules() if hasattr(m, "attn1") and hasattr(m, "ff")]


class ReferenceNetBanks(list):
    """The writer's ``attn1`` inputs, one (1, N, C) tensor per decoder block."""


@dataclass(frozen=True)
class ReferenceNetRead:
    """Plan of a U-Net call that reads the banks: ``mask`` is the latent sketch mask (1, 1, h, w)."""

    banks: ReferenceNetBanks
    mask: torch.Tensor
    threshold: float = READER_THRESHOLD
    #: per block: the module input kept between the pre-hook and the hook; per grid: the resized mask
    pending: dict = field(default_factory=dict, compare=False, repr=False)
    level_masks: dict = field(default_factory=dict, compare=False, repr=False)

    def level_mask(self, tokens: int, device: torch.device) -> torch.Tensor:
        """``m`` bicubic-resized to the grid of ``tokens`` query tokens, (1, N, 1) float32 (not clamped)."""
        key = (tokens, str(device))
        if key not in self.level_masks:
            h, w = self.mask.shape[-2:]
            for step in range(1, 6):
                size = (h // 2 ** step, w // 2 ** step)
                if size[0] * size[1] == tokens:
                    break
            else:
                raise RuntimeError(f"ColorizeDiffusion: no U-Net level of a {h}x{w} latent has {tokens} tokens")
            resized = F.interpolate(self.mask.float(), size=size, mode="bicubic", align_corners=False)
            self.level_masks[key] = resized.flatten(2).transpose(1, 2).to(device)
        return self.level_masks[key]


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


class ReferenceNetBankWrite(Processor):
    """Keeps each ReferenceNet decoder block's ``attn1`` input in :attr:`UNetCall.reference_net` (a bank list)."""

    def attach(self, net: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        return [block.attn1.register_forward_pre_hook(self._hook(index, current), with_kwargs=True)
                for index, block in enumerate(decoder_transformer_blocks(net))]

    @staticmethod
    def _hook(index: int, current: CurrentCall):
        def write(module, args, kwargs):
            call = current()
            banks = call.reference_net if call is not None else None
            if isinstance(banks, ReferenceNetBanks):
                if len(banks) != index:
                    raise RuntimeError("ColorizeDiffusion: ReferenceNet banks written out of order")
                banks.append(_hidden(args, kwargs).detach())
            return None

        return write


class ReferenceNetBankRead(Processor):
    """The masked two-attention self-attention of the U-Net's decoder blocks (see the module docstring)."""

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        attentions = [block.attn1 for block in decoder_transformer_blocks(unet)]
        keep = [a.register_forward_pre_hook(self._keep(i, current), with_kwargs=True) for i, a in enumerate(attentions)]
        return keep + [a.register_forward_hook(self._select(i, current), with_kwargs=True)
                       for i, a in enumerate(attentions)]

    @staticmethod
    def _read(current: CurrentCall) -> Optional[ReferenceNetRead]:
        call = current()
        read = call.reference_net if call is not None else None
        return read if isinstance(read, ReferenceNetRead) else None

    def _keep(self, index: int, current: CurrentCall):
        def keep(module, args, kwargs):
            read = self._read(current)
            if read is not None:
                if index >= len(read.banks):
                    raise RuntimeError(f"ColorizeDiffusion: {len(read.banks)} ReferenceNet banks for more U-Net "
                                       "decoder blocks")
                read.pending[index] = _hidden(args, kwargs)
            return None

        return keep

    def _select(self, index: int, current: CurrentCall):
        def select(module, args, kwargs, own):
            read = self._read(current)
            hidden = read.pending.pop(index, None) if read is not None else None
            if hidden is None:
                return None
            bank = read.banks[index].to(device=hidden.device, dtype=hidden.dtype).expand(hidden.shape[0], -1, -1)
            # .forward: the module's own (host) kernel over the bank, without re-entering these hooks
            from_bank = module.forward(hidden, context=bank)
            m = read.level_mask(hidden.shape[1], hidden.device)
            return torch.where(m > read.threshold, own, from_bank.to(own.dtype))

        return select
