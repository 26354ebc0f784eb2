"""Dual classifier-free guidance, the reference-guidance window and cross-attention scales (method §4.3, §5).

Pure functions over tensors and floats, shared by the host-free pipeline and the webui adapter.

Row roles of one denoiser call (method §5.1):

* ``c``        -- full condition: sketch hints, reference tokens;
* ``u_ref``    -- reference dropped: sketch hints, zero tokens (same token count);
* ``u_sketch`` -- sketch dropped: hints of a blank (all -1) sketch, reference tokens.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

COND, REF_DROPPED, SKETCH_DROPPED = "c", "u_ref", "u_sketch"

NUM_TIMESTEPS = 1000

#: Transformer-block indices of each level (method §4.1 "groups"), applied in this order by level control.
LEVEL_BLOCKS: dict[str, tuple[int, ...]] = {
    "encoder": (0, 1, 2, 3, 4, 5),
    "middle": (2, 3, 10, 11, 12),
    "low": (4, 5, 7, 8, 9),
}


def level_layers(num_layers: int = 16) -> dict[str, tuple[int, ...]]:
    """The blocks whose scale each level sets in the end (later levels overwrite earlier ones, method §4.3):
    encoder 0-1, middle 2, 3, 10-12, low 4, 5, 7-9; blocks 6 and 13-15 belong to none."""
    owner: dict[int, str] = {}
    for level, blocks in LEVEL_BLOCKS.items():
        owner.update({block: level for block in blocks if block < num_layers})
    return {level: tuple(sorted(b for b, o in owner.items() if o == level)) for level in LEVEL_BLOCKS}


class GuidanceMode(enum.IntEnum):
    """``[g_r > 1] + 10 [g_s > 1]`` as in the original's ``GuidanceFlag`` (method §5.2)."""

    NONE = 0
    REFERENCE = 1
    SKETCH = 10
    BOTH = 11


def guidance_mode(reference_guidance: float, sketch_guidance: float) -> GuidanceMode:
    """Mode from the two scales; a scale of 1 (or below) removes its unconditional pass entirely."""
    return GuidanceMode(int(reference_guidance > 1) + 10 * int(sketch_guidance > 1))


def row_roles(mode: GuidanceMode) -> tuple[str, ...]:
    """Row groups of a denoiser call, in batch order ``[c | u_ref | u_sketch]`` (method §5.2)."""
    return {
        GuidanceMode.NONE: (COND,),
        GuidanceMode.REFERENCE: (COND, REF_DROPPED),
        GuidanceMode.SKETCH: (COND, SKETCH_DROPPED),
        GuidanceMode.BOTH: (COND, REF_DROPPED, SKETCH_DROPPED),
    }[mode]


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``D_u + g (D_c - D_u)``."""
    return uncond + (cond - uncond) * scale


def combine(outputs: Mapping[str, torch.Tensor], mode: GuidanceMode, reference_guidance: float,
            sketch_guidance: float) -> torch.Tensor:
    """Dual guidance (method §5.3) on denoiser outputs split by role.

    reference: ``D = D_u0 + g_r (D_c - D_u0)``; sketch: ``D = D_u1 + g_s (D_c - D_u1)``;
    both: ``D = ½ [D_u0 + g_r (D_c - D_u0) + D_u1 + g_s (D_c - D_u1)]``; none: ``D = D_c``.
    Valid in eps, v and x0 space alike, because those are affine in each other with row-independent
    coefficients and each formula's weights sum to 1.
    """
    d_c = outputs[COND]
    if mode == GuidanceMode.NONE:
        return d_c
    if mode == GuidanceMode.REFERENCE:
        return cfg(outputs[REF_DROPPED], d_c, reference_guidance)
    if mode == GuidanceMode.SKETCH:
        return cfg(outputs[SKETCH_DROPPED], d_c, sketch_guidance)
    return 0.5 * (cfg(outputs[REF_DROPPED], d_c, reference_guidance)
                  + cfg(outputs[SKETCH_DROPPED], d_c, sketch_guidance))


def split_rows(output: torch.Tensor, roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """Split a block-wise batch ``[role0 × bs, role1 × bs, ...]`` into a dict by role."""
    return dict(zip(roles, output.chunk(len(roles), dim=0)))


def progress(t: "float | torch.Tensor") -> float:
    """Sampling progress ``τ = 1 - t / 999``: 0 at the noisiest timestep, 1 at the end (method §5.4)."""
    t0 = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
    return 1.0 - t0 / (NUM_TIMESTEPS - 1)


def reference_window_open(tau: float, start: float, end: float, no_start: float, no_end: float) -> bool:
    """Whether the reference conditions this step (method §5.4, mid-2024 non-sticky form).

    Closed when ``τ < start`` or ``τ > end`` or ``no_start ≤ τ ≤ no_end``; then every row's context is one
    zero token. Recomputed for every call from the original context, never written back.
    """
    return not (tau < start or tau > end or (no_start <= tau <= no_end))


@dataclass(frozen=True)
class GuidanceWindow:
    """When the reference conditions sampling, on the progress ``τ`` (method §5.4): open on ``[start, end]``
    except on ``[no_start, no_end]`` (negative bounds, the default, disable that gap)."""

    start: float = 0.0
    end: float = 1.0
    no_start: float = -0.05
    no_end: float = -0.05

    def is_open(self, tau: float) -> bool:
        return reference_window_open(tau, self.start, self.end, self.no_start, self.no_end)


#: The XL models' transformer-block groups (method-xl §2.4), in DFS order of the 70 blocks.
XL_GROUP_BLOCKS: dict[str, tuple[int, ...]] = {
    "high": tuple(range(0, 4)) + tuple(range(64, 70)),
    "low": tuple(range(4, 24)) + tuple(range(34, 64)),
    "bottom": tuple(range(24, 34)),
    "encoder": tuple(range(0, 24)),
    "decoder": tuple(range(34, 70)),
}
XL_BLOCK_COUNT = 70


def xl_cross_attention_scales(version: str, reference_strength: float,
                              level_scales: Mapping[str, float] | object) -> list[float]:
    """Per-block cross-attention scales of the XL models (method-xl §5.4, §12 #2-3).

    ``sdxl``: every block ``E·S`` (the middle and low scales are not used). ``xlv2``: all 70 reset to 1, then the
    encoder blocks 0-23 get ``E·S`` and the low group (4-23, 34-63) ``L·S``, in that order; the bottom (24-33)
    and high decoder blocks (64-69) stay at 1 (the original leaves them at whatever they were, §12 #3).
    """
    def level(name: str) -> float:
        value = level_scales[name] if isinstance(level_scales, Mapping) else getattr(level_scales, name)
        return float(value) * float(reference_strength)

    if version == "sdxl":
        return [level("encoder")] * XL_BLOCK_COUNT
    if version != "xlv2":
        raise ValueError(f"not an XL version: {version!r}")
    scales = [1.0] * XL_BLOCK_COUNT
    for name, group in (("encoder", "encoder"), ("low", "low")):
        for block in XL_GROUP_BLOCKS[group]:
            scales[block] = level(name)
    return scales


def cross_attention_scales(reference_strength: float, level_scales: Mapping[str, float] | object,
                           layer_scales: Optional[Sequence[float]] = None,
                           num_layers: int = 16) -> list[float]:
    """Per-block cross-attention scales ``s_i`` (method §4.3).

    Accurate control (``layer_scales`` given): ``s_i`` = the i-th value (mid-2024 mapping, no off-by-one).
    Level control: reset every ``s_i`` to 1 (state-independent, reproduces the original's first run), then
    assign ``E·S`` to the encoder blocks, ``M·S`` to the middle blocks and ``L·S`` to the low blocks, in that
    order, later levels overwriting earlier ones. Blocks 6 and 13-15 belong to no level and stay at 1.
    """
    if layer_scales is not None:
        if len(layer_scales) != num_layers:
            raise ValueError(f"expected {num_layers} layer scales, got {len(layer_scales)}")
        return [float(s) for s in layer_scales]
    scales = [1.0] * num_layers
    for level, blocks in LEVEL_BLOCKS.items():
        value = (level_scales[level] if isinstance(level_scales, Mapping) else getattr(level_scales, level))
        for block in blocks:
            if block < num_layers:
                scales[block] = float(value) * float(reference_strength)
    return scales
