"""Text manipulation of the reference tokens, its prompt-sequence format and its heat map (method §7).

A manipulation group (:class:`~lib_colorize.options.Manipulation`) moves the CLIP reference tokens that are most
similar to a *control* prompt towards a *target* prompt (optionally away from an *anchor* prompt). Everything
here is a small pure function over tensors, in the style of k-diffusion; the CLIP encoders are passed in as
callables so this module never loads a model:

* ``encode_text(list[str]) -> Tensor (N, 1, D)``: L2-normalised EOT text embeddings (method §2.5);
* ``encode_full(Tensor (1, 3, H, W) in [-1, 1]) -> Tensor (1, 1 + N, D)``: "full" image tokens (method §2.3).

Notation (method §7): ``v`` = full tokens ``(B, 1+N, D)`` = ``cat(cls, P)``; ``x·e`` = plain dot product of a
token with a unit text vector (``calculate_scale(v, t) = v @ tᵀ``; image tokens are *not* normalised).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInput
from .images import decode_image
from .options import DEFAULT_THRESHOLDS, MAX_MANIPULATIONS, Manipulation, parse_manipulation

__all__ = [
    "threshold_weights", "local_manipulate_step", "global_manipulate_step", "apply_manipulations",
    "format_manipulation_line", "format_manipulation_sequence", "parse_manipulation_sequence",
    "similarity_map", "threshold_levels", "render_heatmap", "limit_heatmap_reference", "manipulation_heatmap",
    "group_heatmaps", "tile_heatmaps",
    "HEATMAP_LEVEL", "HEATMAP_MAX_SIDE", "HEATMAP_GRID",
]

TextEncoder = Callable[[Sequence[str]], torch.Tensor]
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]

#: ``ratio`` of the original's ``compute_pwv``: the least similar tokens are pushed back by ``ratio * d``.
NEGATIVE_RATIO = 2.0
#: One heat-map layer: ``uint8(255 * 0.25)`` = 63 (truncation of 63.75), so four layers sum to at most 252.
HEATMAP_LEVEL = int(255 * 0.25)
#: References larger than this on a side are shrunk (bicubic) before the heat map is computed (method §7.5).
HEATMAP_MAX_SIDE = 4096
#: The heat map's grid lines: one cell per CLIP patch token of the 16 x 16 grid.
HEATMAP_GRID = 16


# ----------------------------------------------------------------------------------------------- helpers
def _direction(embedding: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A text embedding as ``(B or 1, 1, D)`` on ``like``'s device and dtype.

    Accepts ``(D,)``, ``(1, D)`` / ``(B, D)`` (one row per batch item) or ``(B, 1, D)``.
    """
    embedding = embedding.to(device=like.device, dtype=like.dtype)
    if embedding.dim() == 1:
        return embedding[None, None]
    if embedding.dim() == 2:
        return embedding[:, None]
    if embedding.dim() == 3 and embedding.shape[1] == 1:
        return embedding
    raise ValueError(f"text embedding must be (D,), (B, D) or (B, 1, D); got {tuple(embedding.shape)}")


def _project(tokens: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``tokens · direction`` per token: ``(B, N, D)`` x ``(B|1, 1, D)`` -> ``(B, N, 1)``."""
    return tokens @ direction.transpose(-1, -2)


def _work_dtype(tokens: torch.Tensor) -> torch.dtype:
    """Compute in at least float32 (fp16/bf16 token tensors are upcast, results cast back)."""
    return torch.promote_types(tokens.dtype, torch.float32)


# ------------------------------------------------------------------------------- threshold weights (§7.3)
def threshold_weights(similarity: torch.Tensor, shift: Union[torch.Tensor, float],
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """Per-token weights ``PW(s, d)`` (method §7.3, the original's ``compute_pwv`` with ratio 2).

    ``similarity`` s is ``(B, N, 1)``; it is min-max normalised over the N tokens of each batch item,
    ``m = (s - min s) / (max s - min s)``. With thresholds ``t0 < t1 < t2 < t3`` and shift ``d``
    (a float or ``(B, 1, 1)``), token by token::

        m <= t0          ->  -2 d
        t0 <  m <= t1    ->  -d + d (m - t0) / (t1 - t0)            (-d  .. 0)
        t1 <  m <= t2    ->  0.5 d (m - t1) / (t2 - t1)             (0   .. 0.5 d)
        t2 <  m <= t3    ->  0.5 d + 0.5 d (m - t2) / (t3 - t2)     (0.5 d .. d)
        m >  t3          ->  d

    (Each band includes its upper edge; the only discontinuity is at ``t0``: ``-2d`` at ``m = t0``, ``-d``
    just above.) If all N similarities are equal (the original divides 0/0 and returns NaN), ``m = 0``.
    """
    if similarity.dim() != 3 or similarity.shape[-1] != 1:
        raise ValueError(f"similarity must be (B, N, 1); got {tuple(similarity.shape)}")
    if len(thresholds) != 4:
        raise ValueError(f"expected 4 thresholds; got {len(thresholds)}")
    t0, t1, t2, t3 = (float(t) for t in thresholds)
    smin = similarity.amin(dim=1, keepdim=True)
    smax = similarity.amax(dim=1, keepdim=True)
    span = smax - smin
    m = torch.where(span > 0, (similarity - smin) / torch.where(span > 0, span, torch.ones_like(span)),
                    torch.zeros_like(similarity))
    d = shift if isinstance(shift, torch.Tensor) else torch.tensor(float(shift), dtype=similarity.dtype,
                                                                   device=similarity.device)
    d = d.to(device=similarity.device, dtype=similarity.dtype)

    band1 = -d + d * (m - t0) / (t1 - t0)
    band2 = 0.5 * d * (m - t1) / (t2 - t1)
    band3 = 0.5 * d + 0.5 * d * (m - t2) / (t3 - t2)
    low = (-NEGATIVE_RATIO * d).expand_as(m)
    high = d.expand_as(m)
    # Resolve the bands from the top down, so each mask is a simple strict comparison.
    out = torch.where(m > t3, high, band3)
    out = torch.where(m > t2, out, band2)
    out = torch.where(m > t1, out, band1)
    out = torch.where(m > t0, out, low)
    return out


# ----------------------------------------------------------------------------- local manipulation (§7.2)
def local_manipulate_step(tokens_full: torch.Tensor, target: torch.Tensor, anchor: Optional[torch.Tensor],
                          control: torch.Tensor, scale: float, enhance: bool = False,
                          thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """One local manipulation group on full tokens ``v = cat(cls, P)`` of shape ``(B, 1+N, D)`` (method §7.2).

    ``target`` t, ``anchor`` a (or ``None``) and ``control`` c are unit text embeddings ``(1, D)``, ``(B, D)``
    or ``(B, 1, D)``; ``scale`` is λ. The cls token is returned unchanged; the N local tokens become::

        with anchor:     d = λ - cls·t   (enhance: d = λ - cls·a)
                         P <- P + (PW(P·c, d) + [enhance] P·a) (t - a)
        without anchor:  d = λ - cls·t
                         P <- P + PW(P·c, d) t            (enhance has no effect without an anchor)

    with ``PW`` = :func:`threshold_weights`.
    """
    if tokens_full.dim() != 3 or tokens_full.shape[1] < 2:
        raise ValueError(f"tokens_full must be (B, 1+N, D); got {tuple(tokens_full.shape)}")
    out_dtype = tokens_full.dtype
    v = tokens_full.to(_work_dtype(tokens_full))
    cls, local = v[:, :1], v[:, 1:]
    t = _direction(target, v)
    c = _direction(control, v)
    similarity = _project(local, c)
    if anchor is not None:
        a = _direction(anchor, v)
        d = scale - (_project(cls, a) if enhance else _project(cls, t))
        weight = threshold_weights(similarity, d, thresholds)
        if enhance:
            weight = weight + _project(local, a)
        local = local + weight * (t - a)
    else:
        d = scale - _project(cls, t)
        local = local + threshold_weights(similarity, d, thresholds) * t
    return torch.cat([cls, local], dim=1).to(out_dtype)


# ---------------------------------------------------------------------------- global manipulation (§7.4)
def global_manipulate_step(cls: torch.Tensor, target: torch.Tensor, anchor: Optional[torch.Tensor],
                           scale: float, enhance: bool = False) -> torch.Tensor:
    """One group on a cls token ``v`` ``(B, 1, D)`` (method §7.4; cls-token models only, unused by the
    released local-token checkpoints)::

        anchor, not enhance:   v + λ (t - a)
        anchor, enhance:       v' = v - (v·a) a;  then v' + λ t
        no anchor, enhance:    v + λ t
        no anchor, otherwise:  v + (λ - v·t) t
    """
    out_dtype = cls.dtype
    v = cls.to(_work_dtype(cls))
    t = _direction(target, v)
    if anchor is not None:
        a = _direction(anchor, v)
        if not enhance:
            return (v + scale * (t - a)).to(out_dtype)
        v = v - _project(v, a) * a
    if enhance:
        return (v + scale * t).to(out_dtype)
    return (v + (scale - _project(v, t)) * t).to(out_dtype)


def _prompt(text: str) -> str:
    """Empty prompts are the literal word ``none`` (method §7.1)."""
    return text.strip() or "none"


def apply_manipulations(tokens_full: torch.Tensor, groups: Sequence[Manipulation],
                        encode_text: TextEncoder) -> torch.Tensor:
    """Apply ``groups`` in order with :func:`local_manipulate_step` (method §7.2).

    All prompts of all groups are encoded in one batched ``encode_text`` call (each distinct text once).
    An anchor of ``none`` (or empty) means "no anchor"; a control of ``none`` is encoded as the word "none"
    like the original. Every group is applied, including groups with scale 0 (which still shift the tokens);
    whether manipulation runs at all is the caller's decision (``ColorizeOptions.active_manipulations``).
    """
    groups = tuple(groups)
    if not groups:
        return tokens_full
    texts: list[str] = []
    slots: dict[str, int] = {}

    def slot(text: str) -> int:
        if text not in slots:
            slots[text] = len(texts)
            texts.append(text)
        return slots[text]

    plan = [(slot(_prompt(g.target)), slot(_prompt(g.anchor)) if g.has_anchor else None,
             slot(_prompt(g.control)), g) for g in groups]
    embeddings = encode_text(texts)
    if embeddings.dim() == 2:
        embeddings = embeddings[:, None]
    if embeddings.dim() != 3 or embeddings.shape[0] != len(texts) or embeddings.shape[1] != 1:
        raise ValueError(f"encode_text returned {tuple(embeddings.shape)} for {len(texts)} texts; "
                         f"expected ({len(texts)}, 1, D)")
    v = tokens_full
    for ti, ai, ci, group in plan:
        v = local_manipulate_step(v, embeddings[ti], None if ai is None else embeddings[ai], embeddings[ci],
                                  float(group.scale), bool(group.enhance), tuple(group.thresholds))
    return v


# ------------------------------------------------------------------------ prompt-sequence format (§7.1)
_LINE_RE = re.compile(
    r"^\[target\] (?P<target>.*?); \[anchor\] (?P<anchor>.*?); \[control\] (?P<control>.*?); "
    r"\[scale\](?P<scale>.*?); \[enhanced\](?P<enhance>.*?); \[ts0\](?P<ts0>.*?); \[ts1\](?P<ts1>.*?); "
    r"\[ts2\](?P<ts2>.*?); \[ts3\](?P<ts3>.*)$")
_FORMAT_HINT = ("expected '[target] T; [anchor] A; [control] C; [scale] λ; [enhanced] True|False; "
                "[ts0] t0; [ts1] t1; [ts2] t2; [ts3] t3'")
_SEPARATORS = ("[target]", "[anchor]", "[control]", "[scale]", "[enhanced]", "[ts0]", "[ts1]", "[ts2]", "[ts3]")


def _number_text(value: float) -> str:
    """``str(float)`` like the original app (shortest repr: round-trips exactly)."""
    return str(float(value))


def format_manipulation_line(group: Manipulation) -> str:
    """One group as a line of the "Final prompt" sequence (method §7.1; the original app's "Add" button)::

        [target] T; [anchor] A; [control] C; [scale] λ; [enhanced] e; [ts0] t0; [ts1] t1; [ts2] t2; [ts3] t3

    Empty prompts are written as ``none``. :func:`parse_manipulation_sequence` reads it back unchanged.
    """
    prompts = []
    for key in ("target", "anchor", "control"):
        text = _prompt(getattr(group, key))
        if "\n" in text or "\r" in text or any(sep in text for sep in _SEPARATORS):
            raise InvalidInput("manipulations", f"{key} prompt {text!r} cannot be written as a prompt-sequence "
                                                "line (it contains a line break or a [field] marker)")
        prompts.append(text)
    ts = tuple(group.thresholds)
    if len(ts) != 4:
        raise InvalidInput("manipulations", f"expected 4 thresholds; got {len(ts)}")
    return (f"[target] {prompts[0]}; [anchor] {prompts[1]}; [control] {prompts[2]}; "
            f"[scale] {_number_text(group.scale)}; [enhanced] {bool(group.enhance)}; "
            f"[ts0] {_number_text(ts[0])}; [ts1] {_number_text(ts[1])}; [ts2] {_number_text(ts[2])}; "
            f"[ts3] {_number_text(ts[3])}")


def format_manipulation_sequence(groups: Sequence[Manipulation]) -> str:
    """Several groups, one line each, separated by ``\\n``."""
    return "\n".join(format_manipulation_line(g) for g in groups)


def parse_manipulation_sequence(text: Optional[str], *, legacy_enhance_bug: bool = False
                                ) -> tuple[Manipulation, ...]:
    """Read the prompt-sequence text (method §7.1): one group per non-blank line, in order.

    ``[enhanced]`` is read as ``True``/``False`` (any case). With ``legacy_enhance_bug=True`` it is read like
    the original ``parse_prompts`` does, ``bool(" False") == True``: every saved line is enhanced unless the
    field is empty (for parity runs against the original app).

    Values are checked like API options (scale in [0, 15], thresholds strictly increasing inside (0, 1),
    at most 16 groups). A malformed line raises :class:`~lib_colorize.errors.InvalidInput` with
    ``field='manipulations'`` and a message naming the (1-based) line number and the problem.
    """
    if text is None:
        return ()
    groups: list[Manipulation] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        groups.append(_parse_line(line, number, legacy_enhance_bug))
    if len(groups) > MAX_MANIPULATIONS:
        raise InvalidInput("manipulations", f"{len(groups)} groups given; at most {MAX_MANIPULATIONS}")
    return tuple(groups)


def _parse_line(line: str, number: int, legacy_enhance_bug: bool) -> Manipulation:
    match = _LINE_RE.match(line)
    if match is None:
        missing = [sep for sep in _SEPARATORS if sep not in line]
        detail = f"missing {', '.join(missing)}" if missing else "fields out of order or separators malformed"
        raise InvalidInput("manipulations", f"line {number}: {detail}; {_FORMAT_HINT}")
    fields = match.groupdict()

    def number_field(key: str, label: str) -> float:
        raw = fields[key].strip()
        try:
            return float(raw)
        except ValueError:
            raise InvalidInput("manipulations", f"line {number}: {label} {raw!r} is not a number") from None

    scale = number_field("scale", "[scale]")
    thresholds = tuple(number_field(f"ts{i}", f"[ts{i}]") for i in range(4))
    if legacy_enhance_bug:
        enhance = bool(fields["enhance"])
    else:
        flag = fields["enhance"].strip().lower()
        if flag not in ("true", "false"):
            raise InvalidInput("manipulations", f"line {number}: [enhanced] {fields['enhance'].strip()!r} is "
                                                "not True or False")
        enhance = flag == "true"
    try:
        return parse_manipulation({"target": fields["target"], "anchor": fields["anchor"],
                                   "control": fields["control"], "scale": scale, "enhance": enhance,
                                   "thresholds": thresholds}, number - 1)
    except InvalidInput as error:
        key = error.field.rpartition(".")[2]
        raise InvalidInput("manipulations", f"line {number}: {key}: {error.message}") from None


# ------------------------------------------------------------------------------------- heat map (§7.5)
def similarity_map(tokens_full: torch.Tensor, control_embedding: torch.Tensor, size: tuple[int, int]
                   ) -> np.ndarray:
    """Similarity of each local token to the control prompt, as an image ``(H, W)`` float32 (method §7.5).

    ``s = P·c`` over the N = g x g local tokens of ``tokens_full`` ``(1, 1+N, D)`` (row-major grid), then
    ``F.interpolate(s.reshape(1, 1, g, g), size=(H, W), mode="bicubic", align_corners=False)``.
    """
    if tokens_full.dim() != 3 or tokens_full.shape[0] != 1:
        raise ValueError(f"tokens_full must be (1, 1+N, D); got {tuple(tokens_full.shape)}")
    v = tokens_full.to(_work_dtype(tokens_full))
    local = v[:, 1:]
    grid = math.isqrt(local.shape[1])
    if grid * grid != local.shape[1]:
        raise ValueError(f"{local.shape[1]} local tokens do not form a square grid")
    s = _project(local, _direction(control_embedding, v)[:1])  # (1, N, 1)
    s = s.permute(0, 2, 1).reshape(1, 1, grid, grid)
    height, width = int(size[0]), int(size[1])
    s = F.interpolate(s, size=(height, width), mode="bicubic", align_corners=False)
    return s[0, 0].detach().to(device="cpu", dtype=torch.float32).numpy()


def threshold_levels(sim_map: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Quantise a similarity map into ``{0, 63, 126, 189, 252}`` (uint8, same shape; method §7.5).

    ``m = (map - min) / (max - min)`` over all pixels (float32); each threshold adds 63
    (= ``uint8(255 * 0.25)``) where ``m >= th``, so the value is 63 x the number of thresholds reached.
    A constant map gives ``m = 0`` everywhere.
    """
    values = np.asarray(sim_map, dtype=np.float32)
    lo, hi = values.min(), values.max()
    span = np.float32(hi - lo)
    m = (values - lo) / span if span > 0 else np.zeros_like(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    for th in thresholds:
        out += np.where(m < np.float32(th), np.uint8(0), np.uint8(HEATMAP_LEVEL)).astype(np.uint8)
    return out


def limit_heatmap_reference(reference: Image.Image, max_side: int = HEATMAP_MAX_SIDE) -> Image.Image:
    """Shrink (PIL bicubic) so the longer side is ``max_side``, like the original's visualisation; smaller
    images are returned as they are."""
    width, height = reference.size
    if width <= max_side and height <= max_side:
        return reference
    if width > height:
        size = (max_side, int(float(max_side) / width * height))
    else:
        size = (int(float(max_side) / height * width), max_side)
    return reference.resize(size, Image.BICUBIC)


def render_heatmap(reference: Image.Image, levels: np.ndarray) -> Image.Image:
    """Overlay the quantised map on the reference (method §7.5).

    ``cv2.applyColorMap(levels, COLORMAP_JET)`` (BGR -> RGB), blended ``0.3 ref + 0.7 heat`` with
    ``cv2.addWeighted``; black grid lines at rows ``i (H // 16)`` and columns ``i (W // 16)``, i = 0..15.
    ``levels`` must have the size of the reference after :func:`limit_heatmap_reference`; the result has it too.
    """
    import cv2

    reference = limit_heatmap_reference(decode_image(reference, "reference"))
    width, height = reference.size
    levels = np.ascontiguousarray(levels, dtype=np.uint8)
    if levels.shape != (height, width):
        raise ValueError(f"levels are {levels.shape[1]}x{levels.shape[0]}, the reference is {width}x{height}")
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    result = cv2.addWeighted(np.asarray(reference, dtype=np.uint8), 0.3, heat, 0.7, 0)
    row_step, col_step = height // HEATMAP_GRID, width // HEATMAP_GRID
    for i in range(HEATMAP_GRID):
        result[i * row_step, :] = 0
        result[:, i * col_step] = 0
    return Image.fromarray(result)


def manipulation_heatmap(reference: Image.Image, groups_saved: Sequence[Manipulation], control_text: str,
                         thresholds: Sequence[float], encode_full: ImageEncoder, encode_text: TextEncoder
                         ) -> Image.Image:
    """The "Visualize" image (method §7.5): which reference regions a control prompt selects.

    The *unpadded* reference (shrunk to at most 4096 px a side) is encoded with ``encode_full``
    (``to_tensor``, [-1, 1]), the saved groups are applied in order (:func:`apply_manipulations`), and the
    similarity to ``control_text`` is thresholded with ``thresholds`` (those of the group being edited) and
    rendered with :func:`render_heatmap`. The result has the size of the (shrunk) reference.
    """
    from .preprocess import image_to_tensor

    reference = limit_heatmap_reference(decode_image(reference, "reference"))
    width, height = reference.size
    with torch.no_grad():
        tokens = encode_full(image_to_tensor(reference))
        tokens = apply_manipulations(tokens, groups_saved, encode_text)
        control = encode_text([_prompt(control_text or "")])
        sim = similarity_map(tokens, control.reshape(control.shape[0], -1)[:1], (height, width))
    return render_heatmap(reference, threshold_levels(sim, thresholds))


def group_heatmaps(reference: Image.Image, groups: Sequence[Manipulation], encode_full: ImageEncoder,
                   encode_text: TextEncoder) -> list[Image.Image]:
    """One heat map per group: the regions group ``i`` selects, i.e. the "Visualize" image of its control prompt
    and thresholds over the reference after groups ``0 .. i-1`` (before group ``i`` itself is applied)."""
    groups = tuple(groups)
    return [manipulation_heatmap(reference, groups[:i], group.control, group.thresholds, encode_full, encode_text)
            for i, group in enumerate(groups)]


def tile_heatmaps(heatmaps: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Heat maps side by side, left to right in group order, on white (for a single output file)."""
    heatmaps = list(heatmaps)
    if not heatmaps:
        raise ValueError("no heat maps to tile")
    width = sum(h.width for h in heatmaps) + gap * (len(heatmaps) - 1)
    canvas = Image.new("RGB", (width, max(h.height for h in heatmaps)), (255, 255, 255))
    left = 0
    for heatmap in heatmaps:
        canvas.paste(heatmap, (left, 0))
        left += heatmap.width + gap
    return canvas
