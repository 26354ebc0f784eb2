"""U-Net processors: each behaviour of ColorizeDiffusion on an ldm-layout U-Net is one object.

==========================  ==========================================  ==================================================
processor                   hooks                                       user options it carries
==========================  ==========================================  ==================================================
:class:`SketchHints`        ``input_blocks[0, 3, 6, 9, 11]`` outputs     sketch, sketch_mode, sketch_strength (the hints)
:class:`CrossAttentionScale` ``attn2.to_out[0]`` inputs                  reference_strength, level_scales, layer_scales
:class:`ReferenceBankWrite` ``attn1`` inputs (reference pass)            injection, injection_start,
                                                                        injection_sketch_fidelity (the pass's hints)
:class:`ReferenceBankRead`  ``attn1`` keys/values and output             injection_reference_fidelity
:class:`ReferenceNetBankWrite` the ReferenceNet's decoder ``attn1`` inputs xlv2 low-level injection (its banks)
:class:`ReferenceNetBankRead` U-Net decoder ``attn1`` output (masked)     xlv2 low-level injection (sketch mask)
:class:`SplitCrossAttention` ``attn2`` (both passes), ``to_out[0]``       bg_enhance, fg_enhance, foreground/background
                                                                        strength, merging_scale, sketch_mask_threshold
:class:`SplitLoRAHooks`     ``attn2.to_q/to_k/to_v`` outputs            (the LoRA side of each pass, per version)
:class:`SkipWarp`           ``output_blocks[j]`` inputs (the skip)      bg_enhance (v2), background_factor (hs_bg)
:class:`StyleModulation`    ``output_blocks[j]`` outputs                style_enhance (v2), merging_scale (M_j)
==========================  ==========================================  ==================================================

:func:`for_generation` builds the set of one generation; the denoiser (:mod:`lib_colorize.denoiser`) enters a
:class:`UNetCall` for every U-Net evaluation. See :mod:`.base` for the mechanism.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .attention_scale import CrossAttentionScale
from .base import (HINT_BLOCKS, Processor, ProcessorSet, UNetCall, live_count, remove_all,
                   transformer_blocks)
from .injection import (BankRead, BankWrite, ReferenceBank, ReferenceBankRead, ReferenceBankWrite,
                        WritePassDone)
from .enhance import SkipWarp, SplitAttention, SplitCrossAttention, SplitLoRAHooks, StyleModulation
from .reference_net import (ReferenceNetBankRead, ReferenceNetBankWrite, ReferenceNetBanks, ReferenceNetRead,
                            decoder_transformer_blocks)
from .sketch_hints import SketchHints

__all__ = ["HINT_BLOCKS", "BankRead", "BankWrite", "CrossAttentionScale", "Processor", "ProcessorSet",
           "ReferenceBank", "ReferenceBankRead", "ReferenceBankWrite", "ReferenceNetBankRead", "ReferenceNetBankWrite",
           "ReferenceNetBanks", "ReferenceNetRead", "SketchHints", "SkipWarp", "SplitAttention", "SplitCrossAttention",
           "SplitLoRAHooks", "StyleModulation", "UNetCall", "decoder_transformer_blocks",
           "WritePassDone", "for_generation", "live_count", "remove_all", "transformer_blocks"]


def for_generation(unet: nn.Module, layer_scales: Optional[Sequence[float]] = None,
                   injection: bool = False, enhance: Optional[object] = None,
                   hint_blocks: Sequence[int] = HINT_BLOCKS) -> ProcessorSet:
    """The processors of one generation: sketch hints always (after the family's ``hint_blocks``); the
    cross-attention scales when given (hooks only where ``s_i`` is not 1); the injection pair when attention
    injection is on; the enhance modes' processors when ``enhance`` (a :class:`lib_colorize.enhance.EnhancePlan`)
    is given: split cross-attention (+ the split LoRA of its modules), the skip warp (v2 BG) and the style
    modulation (v2 style). Not installed yet."""
    processors: list[Processor] = [SketchHints(hint_blocks)]
    if layer_scales is not None:
        processors.append(CrossAttentionScale(layer_scales))
    if injection:
        processors += [ReferenceBankWrite(), ReferenceBankRead()]
    if enhance is not None:
        processors += enhance.processors()
    return ProcessorSet(unet, processors)
