"""Removable hooks that turn an ldm-layout SD2 U-Net into the ColorizeDiffusion U-Net for one generation.

Everything is attached through torch hook handles (never by patching a class or replacing ``forward``), so
the webui's optimised attention kernels keep running and :meth:`ColorizeHooks.remove` restores the module
exactly. Three behaviours (method §3, §4.2, §6.3):

* **sketch hints** -- forward hooks on ``input_blocks[0, 3, 6, 9, 11]`` add ``k_ctl · hint`` to the block
  output, before the skip connection stores it;
* **cross-attention scale** -- a forward pre-hook on every ``attn2.to_out[0]`` multiplies the attention result
  by ``s_i`` before the output projection (the projection bias is not scaled);
* **attention injection** -- kwargs pre/post hooks on every ``attn1``: in a *write* pass the normalised
  hidden states go to a bank; in the following *read* pass self-attention attends to ``[own tokens ; bank]``,
  and the reference-dropped rows blend in plain self-attention by the reference fidelity φ. Those rows are
  taken out of the module's call and computed from two ``N``-key attentions merged by their log-sum-exp
  (:func:`~lib_colorize.attention.blended_self_attention`), which costs ``2N²`` where the original's separate
  plain and injected attentions cost ``3N²`` (``merge_fidelity=False`` keeps the original's way, for benchmarks).

The denoiser sets the per-call state (:meth:`set_call`) and clears it after every U-Net call, so nothing
carries over between steps or generations. A module-level registry lets a host remove hooks left behind by a
crashed generation (:func:`remove_all_hooks`) and lets tests assert there are none (:func:`live_hook_count`).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import blended_self_attention

HINT_BLOCKS = (0, 3, 6, 9, 11)
WRITE, READ = "write", "read"

_registry_lock = threading.Lock()
_live_hooks: "weakref.WeakSet[ColorizeHooks]" = weakref.WeakSet()


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's ``BasicTransformerBlock``s in depth-first order (method §4.1: 16 for SD2).

    Found by structure (a module with ``attn1``, ``attn2`` and ``ff``), so ldm's, sgm's, ours and
    token-merging's subclass all match.
    """
    return [m for m in unet.modules()
            if hasattr(m, "attn1") and hasattr(m, "attn2") and hasattr(m, "ff")]


def live_hook_count() -> int:
    """Number of hook sets currently installed anywhere (0 between generations)."""
    with _registry_lock:
        return sum(1 for h in _live_hooks if h.installed)


def remove_all_hooks() -> int:
    """Remove every installed hook set (self-heal after a crashed generation); returns how many."""
    with _registry_lock:
        hooks = [h for h in _live_hooks if h.installed]
    for h in hooks:
        h.remove()
    return len(hooks)


class WritePassDone(Exception):
    """Raised by the last ``attn1`` of a write pass once the bank is complete (``stop_write_early``); the
    denoiser catches it: the rest of the reference pass would only compute an output that is discarded."""


class ColorizeHooks:
    """The per-generation hook set on one U-Net.

    Use as a context manager (``with ColorizeHooks(unet, layer_scales) as hooks: ...``) or call
    :meth:`install` / :meth:`remove` explicitly; :meth:`remove` is idempotent.
    """

    def __init__(self, unet: nn.Module, layer_scales: Optional[Sequence[float]] = None,
                 injection: bool = False, stop_write_early: bool = False, merge_fidelity: bool = True):
        self.unet = unet
        self.input_blocks = getattr(unet, "input_blocks")
        self.blocks = transformer_blocks(unet)
        if layer_scales is not None and len(layer_scales) != len(self.blocks):
            raise ValueError(f"{len(layer_scales)} layer scales for {len(self.blocks)} transformer blocks")
        self.layer_scales = [float(s) for s in layer_scales] if layer_scales is not None else None
        self.injection = injection
        self.stop_write_early = stop_write_early
        self.merge_fidelity = merge_fidelity
        self._handles: list = []
        # per-call state (set_call / clear_call)
        self.row_hints: Optional[list[torch.Tensor]] = None
        self.injection_mode: Optional[str] = None
        self.bank_index: Optional[torch.Tensor] = None
        self.fidelity_rows: Optional[torch.Tensor] = None
        self.reference_fidelity: float = 0.0
        self.keep_bank = False
        self._bank: dict[int, torch.Tensor] = {}
        self._pending: dict = {}
        self._row_split: dict = {}   # (rows, device) -> (kept, dropped) of this call, shared by its 16 blocks

    # ------------------------------------------------------------------ lifecycle
    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> "ColorizeHooks":
        if self.installed:
            return self
        if len(self.input_blocks) <= max(HINT_BLOCKS):
            raise ValueError(f"U-Net has {len(self.input_blocks)} input blocks; hints need {max(HINT_BLOCKS) + 1}")
        for index in HINT_BLOCKS:
            self._handles.append(self.input_blocks[index].register_forward_hook(self._hint_hook(index)))
        if self.layer_scales is not None and any(s != 1.0 for s in self.layer_scales):
            for index, block in enumerate(self.blocks):
                if self.layer_scales[index] != 1.0:
                    hook = self._scale_hook(self.layer_scales[index])
                    self._handles.append(block.attn2.to_out[0].register_forward_pre_hook(hook))
        if self.injection:
            for index, block in enumerate(self.blocks):
                self._handles.append(block.attn1.register_forward_pre_hook(self._bank_pre_hook(index),
                                                                           with_kwargs=True))
                self._handles.append(block.attn1.register_forward_hook(self._fidelity_hook(index),
                                                                       with_kwargs=True))
        with _registry_lock:
            _live_hooks.add(self)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear_call()

    def __enter__(self) -> "ColorizeHooks":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # ------------------------------------------------------------------ per call
    def set_call(self, row_hints: Optional[Sequence[torch.Tensor]], injection_mode: Optional[str] = None,
                 bank_index: Optional[torch.Tensor] = None, fidelity_rows: Optional[torch.Tensor] = None,
                 reference_fidelity: float = 0.0, keep_bank: bool = False) -> None:
        """Arm the hooks for the next U-Net call.

        ``row_hints``: five tensors with the call's rows (or one row to broadcast), or None for no hints.
        ``injection_mode``: WRITE (fill the bank), READ (attend to it) or None.
        ``bank_index``: for READ, bank row of each call row (None: row i reads bank row i).
        ``fidelity_rows``/``reference_fidelity``: rows (reference dropped) that blend in plain self-attention.
        ``keep_bank``: READ without consuming the bank (a host that evaluates the rows in several calls).
        """
        self.row_hints = list(row_hints) if row_hints is not None else None
        self.injection_mode = injection_mode
        self.bank_index = bank_index
        self.fidelity_rows = fidelity_rows
        self.reference_fidelity = float(reference_fidelity)
        self.keep_bank = keep_bank
        self._row_split.clear()
        if injection_mode == WRITE:
            self._bank.clear()

    def clear_call(self) -> None:
        """Disarm: drop hints and the injection bank (freed after every step)."""
        self.row_hints = None
        self.injection_mode = None
        self.bank_index = self.fidelity_rows = None
        self.keep_bank = False
        self._bank.clear()
        self._pending.clear()
        self._row_split.clear()

    # ------------------------------------------------------------------ hooks
    def _hint_hook(self, position: int):
        slot = HINT_BLOCKS.index(position)

        def hook(module, inputs, output):
            if self.row_hints is None or self.row_hints[slot] is None:
                return None
            hint = self.row_hints[slot].to(device=output.device, dtype=output.dtype)
            if hint.shape[-2:] != output.shape[-2:]:
                # the webui runs the U-Net at sizes that are multiples of 8, not 64 (TorchHijackForUnet)
                hint = F.interpolate(hint, size=output.shape[-2:], mode="nearest")
            if hint.shape[0] not in (1, output.shape[0]):
                raise RuntimeError(f"ColorizeDiffusion: sketch hints for {hint.shape[0]} rows but the U-Net call "
                                   f"has {output.shape[0]} rows")
            return output + hint

        return hook

    @staticmethod
    def _scale_hook(scale: float):
        def hook(module, args):
            # s_i multiplies the attention result before to_out; the bias is not scaled (method §4.2)
            return (args[0] * scale,) + tuple(args[1:])

        return hook

    def _split_fidelity_rows(self, module: nn.Module, rows: int, device: torch.device) -> Optional[tuple]:
        """(rows kept in the module call, reference-dropped rows computed by the merge) on ``device``, or None
        for one call. Computed once per U-Net call (the blocks of a call share it)."""
        if not self.merge_fidelity or self.fidelity_rows is None or self.reference_fidelity <= 1e-5:
            return None
        if not all(hasattr(module, name) for name in ("heads", "to_q", "to_k", "to_v", "to_out")):
            return None
        if not 0 < self.fidelity_rows.numel() < rows:
            return None   # a call of reference-dropped rows only (cond and uncond unbatched): the original's way
        key = (rows, device)
        if key not in self._row_split:
            dropped = self.fidelity_rows.cpu()
            kept_mask = torch.ones(rows, dtype=torch.bool)
            kept_mask[dropped] = False
            self._row_split[key] = (kept_mask.nonzero().flatten().to(device), dropped.to(device))
        return self._row_split[key]

    def _bank_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.injection_mode is None:
                return None
            hidden = args[0] if args else kwargs["x"]
            if self.injection_mode == WRITE:
                self._bank[index] = hidden.detach()
                if self.stop_write_early and len(self._bank) == len(self.blocks):
                    raise WritePassDone()
                return None
            bank = self._bank.get(index) if self.keep_bank else self._bank.pop(index, None)
            if bank is None:
                return None
            if self.bank_index is not None:
                bank = bank.index_select(0, self.bank_index.to(bank.device))
            elif bank.shape[0] != hidden.shape[0]:
                raise RuntimeError("ColorizeDiffusion: injection bank rows do not match the call rows")
            bank = bank.to(hidden.dtype)
            split = self._split_fidelity_rows(module, hidden.shape[0], hidden.device)
            kwargs = dict(kwargs)
            if split is None:
                self._pending[index] = hidden
            else:
                kept, dropped = split
                self._pending[index] = (hidden, bank, kept, dropped)
                hidden, bank = hidden.index_select(0, kept), bank.index_select(0, kept)
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs["x"] = hidden
            kwargs["context"] = torch.cat([hidden, bank], dim=1)
            return args, kwargs

        return hook

    def _fidelity_hook(self, index: int):
        def hook(module, args, kwargs, output):
            pending = self._pending.pop(index, None)
            if pending is None:
                return None
            phi = self.reference_fidelity
            if isinstance(pending, tuple):
                # the reference-dropped rows left the module call: φ-blend from two N-key attentions (§6.3)
                hidden, bank, kept, dropped = pending
                blended = blended_self_attention(module, hidden.index_select(0, dropped),
                                                 bank.index_select(0, dropped), phi)
                full = output.new_empty((hidden.shape[0],) + tuple(output.shape[1:]))
                full.index_copy_(0, kept, output)
                full.index_copy_(0, dropped, blended.to(output.dtype))
                return full
            if self.fidelity_rows is None or self.fidelity_rows.numel() == 0 or phi <= 1e-5:
                return None
            rows = self.fidelity_rows.to(output.device)
            # plain self-attention for the reference-dropped rows; .forward bypasses these hooks
            plain = module.forward(pending.index_select(0, rows), context=None)
            blended = output.clone()
            blended[rows] = phi * plain + (1.0 - phi) * output.index_select(0, rows)
            return blended

        return hook
