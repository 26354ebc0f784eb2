"""Attention injection (method §6.2-§6.3): a reference pass fills a bank, and self-attention then attends to it.

Two processors on every transformer block's ``attn1`` (self-attention), both driven by :attr:`UNetCall.bank`:

* :class:`ReferenceBankWrite` -- in a reference pass (``BankWrite``) each ``attn1`` input, the normalised hidden
  states ``n = norm1(h)`` of the noised reference, goes to the step's :class:`ReferenceBank`. Once the last block
  has written, the rest of the U-Net would only compute an output that is discarded, so the pass stops there
  (:class:`WritePassDone`, caught by the denoiser).
* :class:`ReferenceBankRead` -- in the main pass (``BankRead``) self-attention attends to ``[own tokens ; bank]``
  (``2N`` keys), and the reference-dropped rows get ``φ · plain + (1 − φ) · injected`` self-attention, ``φ`` the
  reference fidelity. Those rows leave the module's call and are computed from two ``N``-key attentions merged by
  their log-sum-exp (:func:`~lib_colorize.attention.blended_self_attention`): ``2N²`` query-key products where the
  original's separate plain and injected attentions cost ``3N²``. Where that is not possible (a module without
  ``to_q``/``to_k``/``to_v``, or a call of reference-dropped rows only), the plain attention is computed separately,
  the original's way.

The bank belongs to one denoiser step: the denoiser makes it for the reference pass and drops it after the step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..attention import blended_self_attention
from .base import CurrentCall, Processor, transformer_blocks

#: below this reference fidelity the blend is plain injection (the original's threshold)
MIN_FIDELITY = 1e-5


class WritePassDone(Exception):
    """Raised by the last ``attn1`` of a reference pass once the bank is complete; the denoiser catches it."""


class ReferenceBank(dict):
    """``attn1`` inputs of one reference pass, by transformer-block index: (rows, N, C) each."""


@dataclass(frozen=True)
class BankWrite:
    """Plan of a reference pass: record every ``attn1`` input into ``bank``."""

    bank: ReferenceBank


@dataclass(frozen=True)
class BankRead:
    """Plan of a main pass that reads the bank.

    ``rows``: the call's row count. ``bank_rows``: for each row, the bank row it attends to (None: row i reads
    bank row i). ``blended``: the call's reference-dropped rows, which get the φ-blend of plain and injected
    self-attention. Index tensors are made on ``device``, the device of the call.
    """

    bank: ReferenceBank
    rows: int
    bank_rows: Optional[torch.Tensor] = None
    blended: range = range(0)
    reference_fidelity: float = 0.0
    device: torch.device = torch.device("cpu")
    #: per-block inputs kept between an ``attn1``'s pre-hook and its hook (emptied by the hook)
    pending: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def blends(self) -> bool:
        return len(self.blended) > 0 and self.reference_fidelity > MIN_FIDELITY

    @functools.cached_property
    def blended_rows(self) -> torch.Tensor:
        return torch.tensor(list(self.blended), dtype=torch.long, device=self.device)

    @functools.cached_property
    def kept_rows(self) -> Optional[torch.Tensor]:
        """Rows that stay in the module call when the blended rows are merged, or None when that is impossible
        (nothing to blend, or only blended rows)."""
        if not self.blends or len(self.blended) >= self.rows:
            return None
        return torch.tensor([i for i in range(self.rows) if i not in self.blended], dtype=torch.long,
                            device=self.device)


def _is_mergeable(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("heads", "to_q", "to_k", "to_v", "to_out"))


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


class ReferenceBankWrite(Processor):
    """Records each ``attn1`` input of a reference pass; stops the pass after the last block."""

    #: stop the reference pass once the bank is complete (the rest of its U-Net evaluation is discarded)
    stops_after_last_block = True

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        blocks = transformer_blocks(unet)
        return [block.attn1.register_forward_pre_hook(self._hook(index, len(blocks), current), with_kwargs=True)
                for index, block in enumerate(blocks)]

    def _hook(self, index: int, total: int, current: CurrentCall):
        def write(module, args, kwargs):
            call = current()
            if call is None or not isinstance(call.bank, BankWrite):
                return None
            call.bank.bank[index] = _hidden_of(args, kwargs).detach()
            if self.stops_after_last_block and len(call.bank.bank) == total:
                raise WritePassDone()
            return None

        return write


class ReferenceBankRead(Processor):
    """Self-attention over ``[own ; bank]``, with the φ-blend of the reference-dropped rows."""

    #: compute the reference-dropped rows from two merged ``N``-key attentions where the module allows it
    merges_blended_rows = True

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        handles = []
        for index, block in enumerate(transformer_blocks(unet)):
            handles.append(block.attn1.register_forward_pre_hook(self._pre_hook(index, current), with_kwargs=True))
            handles.append(block.attn1.register_forward_hook(self._hook(index, current), with_kwargs=True))
        return handles

    def _pre_hook(self, index: int, current: CurrentCall):
        def attend_to_bank(module, args, kwargs):
            call = current()
            read = call.bank if call is not None and isinstance(call.bank, BankRead) else None
            if read is None or index not in read.bank:
                return None
            hidden = _hidden_of(args, kwargs)
            bank = read.bank[index]
            if read.bank_rows is not None:
                bank = bank.index_select(0, read.bank_rows)
            elif bank.shape[0] != hidden.shape[0]:
                raise RuntimeError("ColorizeDiffusion: injection bank rows do not match the call rows")
            bank = bank.to(hidden.dtype)
            kwargs = dict(kwargs)
            if self.merges_blended_rows and read.kept_rows is not None and _is_mergeable(module):
                read.pending[index] = (hidden, bank)
                hidden, bank = hidden.index_select(0, read.kept_rows), bank.index_select(0, read.kept_rows)
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs["x"] = hidden
            elif read.blends:
                read.pending[index] = hidden
            kwargs["context"] = torch.cat([hidden, bank], dim=1)
            return args, kwargs

        return attend_to_bank

    @staticmethod
    def _hook(index: int, current: CurrentCall):
        def blend_reference_dropped_rows(module, args, kwargs, output):
            call = current()
            read = call.bank if call is not None and isinstance(call.bank, BankRead) else None
            pending = read.pending.pop(index, None) if read is not None else None
            if pending is None:
                return None
            phi = read.reference_fidelity
            if isinstance(pending, tuple):
                hidden, bank = pending
                dropped = read.blended_rows
                blended = blended_self_attention(module, hidden.index_select(0, dropped),
                                                 bank.index_select(0, dropped), phi)
                full = output.new_empty((hidden.shape[0],) + tuple(output.shape[1:]))
                full.index_copy_(0, read.kept_rows, output)
                full.index_copy_(0, dropped, blended.to(output.dtype))
                return full
            rows = read.blended_rows
            # plain self-attention of the reference-dropped rows; .forward bypasses these hooks
            plain = module.forward(pending.index_select(0, rows), context=None)
            blended = output.clone()
            blended[rows] = phi * plain + (1.0 - phi) * output.index_select(0, rows)
            return blended

        return blend_reference_dropped_rows
