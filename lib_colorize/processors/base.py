"""The processor mechanism: behaviours attached to an ldm-layout U-Net through removable hook handles.

A :class:`Processor` is one behaviour of ColorizeDiffusion (sketch hints, cross-attention scale, attention
injection, ...). It attaches torch hooks to the modules it changes and returns their handles; it never patches a
class or replaces a ``forward``, so the host's optimised attention kernels keep running and removing the handles
restores the U-Net exactly.

A :class:`ProcessorSet` installs the processors of one generation as a group and removes them as a group (also on
exceptions and interrupts, and through :func:`remove_all` when a crashed generation left them behind). What the
processors do in one U-Net evaluation is the set's :class:`UNetCall`, the typed per-call plan the denoiser enters
with :meth:`ProcessorSet.call`. Between calls there is no plan, and every processor is a no-op: nothing carries
over between U-Net calls, steps or generations.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Input blocks whose outputs receive the sketch encoder's hints (method §3).
HINT_BLOCKS = (0, 3, 6, 9, 11)


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's ``BasicTransformerBlock``s in depth-first order (method §4.1: 16 for SD2).

    Found by structure (a module with ``attn1``, ``attn2`` and ``ff``), so ldm's, sgm's, ours and token merging's
    subclass all match.
    """
    return [m for m in unet.modules()
            if hasattr(m, "attn1") and hasattr(m, "attn2") and hasattr(m, "ff")]


@dataclass(frozen=True)
class UNetCall:
    """What the processors do in ONE U-Net evaluation (built by the denoiser, dropped after the call).

    ``sketch_hints``: the five hint levels for this call's rows (or one row, broadcast), None for no hints.
    ``bank``: the attention-injection step of this call (:mod:`~lib_colorize.processors.injection`): a
    ``BankWrite`` (reference pass) or a ``BankRead``; None outside injection.
    ``reference_net``: xlv2's ReferenceNet attention control (:mod:`~lib_colorize.processors.reference_net`):
    the banks being written (the ReferenceNet's pass) or a ``ReferenceNetRead`` (U-Net calls); None otherwise.

    The enhance modes (:mod:`~lib_colorize.processors.enhance`, method-enhance §3, §8.1; the same for every row):
    ``mask``: the latent sketch mask ``m`` (1, 1, h, w), 1 = character; ``mask_threshold``: ``τ_s``;
    ``split``: the call's split cross-attention (a ``SplitAttention``; None: plain attn2, e.g. outside the
    guidance window, where the context is one zero token); ``hs_bg``: the 12 bg-encoder token maps ``κ·hs_bg``
    (v2 BG enhance, the skip warp); ``style_modulations``: the 12 style vectors ``M_j`` (v2 style enhance).
    """

    sketch_hints: Optional[Sequence[torch.Tensor]] = None
    bank: Optional[object] = None
    reference_net: Optional[object] = None
    mask: Optional[torch.Tensor] = None
    mask_threshold: float = 0.05
    split: Optional[object] = None
    hs_bg: Optional[Sequence[torch.Tensor]] = None
    style_modulations: Optional[Sequence[torch.Tensor]] = None


#: Read access to the current per-call plan; None between calls.
CurrentCall = Callable[[], Optional[UNetCall]]


class Processor:
    """One behaviour. Subclasses implement :meth:`attach`."""

    def attach(self, unet: nn.Module, current: CurrentCall) -> list[RemovableHandle]:
        """Register this behaviour's hooks on ``unet`` and return their handles. Hooks read the per-call plan
        through ``current()`` and do nothing when it is None."""
        raise NotImplementedError


_registry_lock = threading.Lock()
_live_sets: "weakref.WeakSet[ProcessorSet]" = weakref.WeakSet()


class ProcessorSet:
    """The processors of one generation on one U-Net, installed and removed as a group.

    Use as a context manager (``with ProcessorSet(unet, processors) as processors: ...``) or call
    :meth:`install` / :meth:`remove`; :meth:`remove` is idempotent.
    """

    def __init__(self, unet: nn.Module, processors: Sequence[Processor]):
        self.unet = unet
        self.processors = tuple(processors)
        self._handles: list[RemovableHandle] = []
        self._current: Optional[UNetCall] = None

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def current(self) -> Optional[UNetCall]:
        """The plan of the U-Net call in progress (None between calls)."""
        return self._current

    def install(self) -> "ProcessorSet":
        if self.installed:
            return self
        try:
            for processor in self.processors:
                self._handles.extend(processor.attach(self.unet, lambda: self._current))
        except BaseException:
            self.remove()
            raise
        with _registry_lock:
            _live_sets.add(self)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None

    def __enter__(self) -> "ProcessorSet":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    @contextlib.contextmanager
    def call(self, plan: UNetCall) -> Iterator[UNetCall]:
        """Arm the processors with ``plan`` for the U-Net call(s) inside the ``with`` block."""
        if not self.installed:
            raise RuntimeError("ColorizeDiffusion: the processors are not installed")
        self._current = plan
        try:
            yield plan
        finally:
            self._current = None


def live_count() -> int:
    """Number of processor sets installed anywhere (0 between generations)."""
    with _registry_lock:
        return sum(1 for s in _live_sets if s.installed)


def remove_all() -> int:
    """Remove every installed processor set (self-heal after a crashed generation); returns how many."""
    with _registry_lock:
        sets = [s for s in _live_sets if s.installed]
    for processor_set in sets:
        processor_set.remove()
    return len(sets)
