"""Text manipulation, prompt-sequence format and heat map (method §7; §10.3 items 10 and 11).

The original implementation (tellurion-kanata/colorizeDiffusion, ``refnet/sampling/manipulation.py``) cannot be
imported in CI, so the parity tests compare :mod:`lib_colorize.manipulation` with the formulas of method §7.2-§7.5
restated here independently: per-token Python loops in float64 instead of masked tensor algebra.

Tolerances (method §10.4): max |Δ| <= 1e-6 where both sides compute in the same precision, exact for integer
outputs. The token-manipulation tests run the implementation in float64 against the float64 restatement
(<= 1e-6), and again in float32 with a looser bound (FP32_VS_FP64): a float32 rounding of ``m`` is multiplied
by ``d / (t1 - t0)`` (about 20 d) inside PW, so fp32-vs-fp64 differences of a few 1e-6 are expected.
"""
from __future__ import annotations

import itertools
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from lib_colorize.errors import InvalidInput
from lib_colorize.manipulation import (
    HEATMAP_LEVEL, apply_manipulations, format_manipulation_line, format_manipulation_sequence,
    global_manipulate_step, limit_heatmap_reference, local_manipulate_step, manipulation_heatmap,
    parse_manipulation_sequence, render_heatmap, similarity_map, threshold_levels, threshold_weights)
from lib_colorize.options import DEFAULT_THRESHOLDS, Manipulation

#: Thresholds exactly representable in float32, so "m exactly at t_i" is unambiguous in both precisions.
EXACT_THRESHOLDS = (0.5, 0.5625, 0.625, 0.9375)
LEVELS = {0, 63, 126, 189, 252}
D = 32
FP32_VS_FP64 = 5e-5


# ------------------------------------------------------------------------------ restated reference maths
def ref_pw_scalar(m: float, d: float, ts) -> float:
    """§7.3 table, one token (float64)."""
    t0, t1, t2, t3 = ts
    if m <= t0:
        return -2.0 * d
    if m <= t1:
        return -d + d * (m - t0) / (t1 - t0)
    if m <= t2:
        return 0.5 * d * (m - t1) / (t2 - t1)
    if m <= t3:
        return 0.5 * d + 0.5 * d * (m - t2) / (t3 - t2)
    return d


def ref_normalised(s: np.ndarray) -> np.ndarray:
    """Min-max normalisation of one batch item's similarities, in the precision of ``s`` like the tensor code
    (the band a token falls in must not depend on a re-rounding near a threshold)."""
    lo, hi = s.min(), s.max()
    return ((s - lo) / (hi - lo)).astype(s.dtype)


def ref_pw(s: np.ndarray, d, ts) -> np.ndarray:
    """PW over (B, N) similarities with per-batch shifts d (B,), float64 loops; the band is decided in the
    precision of ``s`` (thresholds rounded to it, as torch compares a tensor with a Python float)."""
    ts32 = [float(s.dtype.type(t)) for t in ts]
    out = np.zeros(s.shape, dtype=np.float64)
    for b in range(s.shape[0]):
        m = ref_normalised(s[b])
        for n in range(s.shape[1]):
            mb = float(m[n])
            # band decided in float32 (as torch does); value computed in float64 with the given thresholds
            t0, t1, t2, t3 = ts32
            if mb <= t0:
                band = 0
            elif mb <= t1:
                band = 1
            elif mb <= t2:
                band = 2
            elif mb <= t3:
                band = 3
            else:
                band = 4
            db = float(d[b])
            a0, a1, a2, a3 = (float(t) for t in ts)
            out[b, n] = [-2.0 * db, -db + db * (mb - a0) / (a1 - a0), 0.5 * db * (mb - a1) / (a2 - a1),
                         0.5 * db + 0.5 * db * (mb - a2) / (a3 - a2), db][band]
    return out


def dot(x: np.ndarray, y: np.ndarray) -> float:
    return float(sum(float(a) * float(b) for a, b in zip(x, y)))


def ref_local_step(v: np.ndarray, t: np.ndarray, a, c: np.ndarray, lam: float, enhance: bool, ts,
                   band_dtype=np.float64) -> np.ndarray:
    """§7.2 pseudo-code, token by token in float64. v (B, 1+N, D); t, c, a (D,). ``band_dtype`` is the
    precision in which PW's normalisation and band choice happen (that of the implementation under test)."""
    v = v.astype(np.float64).copy()
    B, n_tok, _ = v.shape
    out = v.copy()
    for b in range(B):
        cls = v[b, 0]
        local = v[b, 1:]
        sims = np.array([dot(p, c) for p in local], dtype=band_dtype)
        if a is not None:
            d = lam - (dot(cls, a) if enhance else dot(cls, t))
            pw = ref_pw(sims[None], [d], ts)[0]
            for n in range(n_tok - 1):
                w = pw[n] + (dot(local[n], a) if enhance else 0.0)
                out[b, 1 + n] = local[n] + w * (t - a)
        else:
            d = lam - dot(cls, t)
            pw = ref_pw(sims[None], [d], ts)[0]
            for n in range(n_tok - 1):
                out[b, 1 + n] = local[n] + pw[n] * t
    return out


def ref_global_step(v: np.ndarray, t, a, lam, enhance) -> np.ndarray:
    """§7.4, one vector at a time in float64. v (B, 1, D)."""
    out = v.astype(np.float64).copy()
    for b in range(v.shape[0]):
        x = out[b, 0]
        if a is not None and not enhance:
            out[b, 0] = x + lam * (t - a)
            continue
        if a is not None:
            x = x - dot(x, a) * a
        out[b, 0] = x + lam * t if enhance else x + (lam - dot(x, t)) * t
    return out


def unit(rng: np.random.Generator, n: int = D) -> np.ndarray:
    x = rng.standard_normal(n)
    return x / np.linalg.norm(x)


class FakeTextEncoder:
    """Deterministic unit vectors per text; records the batches it was asked for."""

    def __init__(self, dim: int = D, seed: int = 1, dtype: torch.dtype = torch.float32):
        self.dim, self.seed, self.calls, self.cache = dim, seed, [], {}
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32

    def vector(self, text: str) -> np.ndarray:
        if text not in self.cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(text.encode())])
            self.cache[text] = unit(rng, self.dim).astype(self.np_dtype)
        return self.cache[text]

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.from_numpy(np.stack([self.vector(t) for t in texts]))[:, None, :]


def random_tokens(seed: int, batch: int = 1, n: int = 256, dim: int = D, std: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 + n, dim, generator=g) * std


# ---------------------------------------------------------------------------------------- PW (§7.3)
@pytest.mark.parametrize("d", [1.7, -0.8])
def test_threshold_weights_exact_band_edges(d):
    """Parity with §7.3: tokens exactly at t0..t3 (bands include their upper edge; -2d at m = t0)."""
    t0, t1, t2, t3 = EXACT_THRESHOLDS
    values = [0.0, 1.0, t0, t1, t2, t3, 0.25, 0.53125, 0.59375, 0.75, 0.96875,
              float(np.nextafter(np.float32(t0), np.float32(1))), float(np.nextafter(np.float32(t3), np.float32(1)))]
    s = torch.tensor(values, dtype=torch.float32)[None, :, None]  # min 0, max 1 -> m == s exactly
    got = threshold_weights(s, d, EXACT_THRESHOLDS)[0, :, 0].double().numpy()
    expected = np.array([ref_pw_scalar(float(np.float32(v)), d, EXACT_THRESHOLDS) for v in values])
    assert np.abs(got - expected).max() <= 1e-6
    # the named edges, spelled out
    assert got[2] == pytest.approx(-2 * d, abs=1e-6)        # m == t0 -> -2d (not -d)
    assert got[3] == pytest.approx(0.0, abs=1e-6)           # m == t1 -> end of band 1
    assert got[4] == pytest.approx(0.5 * d, abs=1e-6)       # m == t2 -> 0.5 d
    assert got[5] == pytest.approx(d, abs=1e-6)             # m == t3 -> d
    assert got[11] == pytest.approx(-d, abs=1e-5)           # just above t0 -> about -d
    assert got[0] == pytest.approx(-2 * d) and got[1] == pytest.approx(d)


def test_threshold_weights_default_thresholds_random_batch():
    """Parity with §7.3 on random similarities, per-batch shifts (B,1,1), default thresholds."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 256, 1, generator=g) * 2.0 + 0.3
    d = torch.tensor([1.25, -0.5, 0.9]).reshape(3, 1, 1)
    got = threshold_weights(s, d, DEFAULT_THRESHOLDS)[..., 0].double().numpy()
    expected = ref_pw(s[..., 0].numpy(), d.flatten().tolist(), DEFAULT_THRESHOLDS)
    assert np.abs(got - expected).max() <= 1e-6
    # every band is populated, so the comparison exercised all five formulas
    m = np.stack([ref_normalised(x) for x in s[..., 0].numpy()])
    t0, t1, t2, t3 = DEFAULT_THRESHOLDS
    for lo, hi in [(-1, t0), (t0, t1), (t1, t2), (t2, t3), (t3, 2)]:
        assert ((m > lo) & (m <= hi)).any()


def test_threshold_weights_constant_similarity_is_finite():
    s = torch.full((1, 16, 1), 0.7)
    out = threshold_weights(s, 1.0, DEFAULT_THRESHOLDS)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.full_like(out, -2.0))


# ------------------------------------------------------------------------------- local step (§7.2)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, FP32_VS_FP64)])
@pytest.mark.parametrize("with_anchor,enhance", [(False, False), (False, True), (True, False), (True, True)])
def test_local_step_matches_restated_pseudocode(with_anchor, enhance, dtype, tol):
    """Parity with the §7.2 pseudo-code (restated as float64 per-token loops); cls untouched exactly."""
    rng = np.random.default_rng(3)
    v = random_tokens(5, batch=2).to(dtype)
    t, c = unit(rng), unit(rng)
    a = unit(rng) if with_anchor else None
    lam = 2.5
    out = local_manipulate_step(v, torch.tensor(t, dtype=dtype)[None],
                                None if a is None else torch.tensor(a, dtype=dtype)[None],
                                torch.tensor(c, dtype=dtype)[None], lam, enhance, DEFAULT_THRESHOLDS)
    assert out.shape == v.shape and out.dtype == v.dtype
    assert torch.equal(out[:, :1], v[:, :1])
    cast = (lambda x: x) if dtype == torch.float64 else (lambda x: x.astype(np.float32).astype(np.float64))
    expected = ref_local_step(v.numpy(), cast(t), None if a is None else cast(a), cast(c), lam, enhance,
                              DEFAULT_THRESHOLDS, v.numpy().dtype.type)
    assert np.abs(out.double().numpy() - expected).max() <= tol
    assert not torch.equal(out, v)


def test_local_step_without_anchor_ignores_enhance():
    rng = np.random.default_rng(4)
    v = random_tokens(6)
    t, c = (torch.tensor(unit(rng), dtype=torch.float32)[None] for _ in range(2))
    assert torch.equal(local_manipulate_step(v, t, None, c, 1.0, False),
                       local_manipulate_step(v, t, None, c, 1.0, True))


def test_local_step_accepts_embedding_shapes_and_half():
    rng = np.random.default_rng(8)
    v = random_tokens(9)
    t, c, a = (torch.tensor(unit(rng), dtype=torch.float32) for _ in range(3))
    ref = local_manipulate_step(v, t[None], a[None], c[None], 1.5, True)
    for shape in [(D,), (1, D), (1, 1, D)]:
        got = local_manipulate_step(v, t.reshape(shape), a.reshape(shape), c.reshape(shape), 1.5, True)
        assert torch.equal(got, ref)
    half = local_manipulate_step(v.half(), t[None], a[None], c[None], 1.5, True)
    assert half.dtype == torch.float16 and torch.equal(half[:, :1], v.half()[:, :1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, FP32_VS_FP64)])
def test_apply_manipulations_sequential_groups_batched_encoding(dtype, tol):
    """Several groups applied in order equal the §7.2 steps chained by hand; texts encoded once, batched."""
    enc = FakeTextEncoder(dtype=dtype)
    groups = (
        Manipulation(target="red hair", anchor="none", control="hair", scale=3.0),
        Manipulation(target="blue eyes", anchor="green eyes", control="eyes", scale=1.5, enhance=True,
                     thresholds=(0.4, 0.5, 0.6, 0.9)),
        Manipulation(target="white dress", anchor="black dress", control="none", scale=0.75),
        Manipulation(target="red hair", anchor="", control="hair", scale=0.0),
    )
    v = random_tokens(11).to(dtype)
    out = apply_manipulations(v, groups, enc)
    assert len(enc.calls) == 1
    batch = enc.calls[0]
    assert len(batch) == len(set(batch))
    assert set(batch) == {"red hair", "hair", "blue eyes", "green eyes", "eyes", "white dress", "black dress",
                          "none"}
    expected = v.numpy().astype(np.float64)
    for g in groups:
        anchor = enc.vector(g.anchor).astype(np.float64) if g.anchor not in ("", "none") else None
        expected = ref_local_step(expected, enc.vector(g.target).astype(np.float64), anchor,
                                  enc.vector(g.control).astype(np.float64), g.scale, g.enhance, g.thresholds,
                                  enc.np_dtype)
    assert torch.equal(out[:, :1], v[:, :1])
    assert out.dtype == dtype
    assert np.abs(out.double().numpy() - expected).max() <= tol


def test_apply_manipulations_no_groups_is_identity_and_skips_encoder():
    enc = FakeTextEncoder()
    v = random_tokens(12)
    assert apply_manipulations(v, (), enc) is v
    assert enc.calls == []


# ------------------------------------------------------------------------------ global step (§7.4)
@pytest.mark.parametrize("with_anchor,enhance", list(itertools.product([False, True], [False, True])))
def test_global_step_four_branches(with_anchor, enhance):
    """Parity with §7.4 restated per vector in float64."""
    rng = np.random.default_rng(21)
    cls = torch.tensor(rng.standard_normal((2, 1, D)), dtype=torch.float32)
    t = unit(rng).astype(np.float32)
    a = unit(rng).astype(np.float32) if with_anchor else None
    out = global_manipulate_step(cls, torch.from_numpy(t)[None], None if a is None else torch.from_numpy(a)[None],
                                 1.75, enhance)
    expected = ref_global_step(cls.numpy(), t.astype(np.float64), None if a is None else a.astype(np.float64),
                               1.75, enhance)
    assert out.shape == cls.shape
    assert np.abs(out.double().numpy() - expected).max() <= 1e-6


def test_global_step_without_enhance_sets_projection_to_scale():
    rng = np.random.default_rng(22)
    cls = torch.tensor(rng.standard_normal((1, 1, D)), dtype=torch.float32)
    t = torch.tensor(unit(rng), dtype=torch.float32)
    out = global_manipulate_step(cls, t[None], None, 2.0, False)
    assert float(out[0, 0] @ t) == pytest.approx(2.0, abs=1e-5)


# ------------------------------------------------------------------------ prompt sequence (§7.1)
ORIGINAL_LINE = ("[target] red hair; [anchor] none; [control] hair; [scale] 2.5; [enhanced] False; "
                 "[ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95")


def test_format_matches_original_add_button_layout():
    g = Manipulation(target="red hair", anchor="none", control="hair", scale=2.5, enhance=False)
    assert format_manipulation_line(g) == ORIGINAL_LINE
    assert format_manipulation_line(Manipulation()) == (
        "[target] none; [anchor] none; [control] none; [scale] 0.0; [enhanced] False; "
        "[ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95")


def test_format_parse_round_trip():
    groups = (
        Manipulation(target="red hair", anchor="black hair", control="hair", scale=2.25, enhance=True,
                     thresholds=(0.1, 0.2, 0.3, 0.4)),
        Manipulation(target="sky", control="background", scale=15.0, thresholds=(0.33, 0.5, 0.66, 0.99)),
        Manipulation(),
        Manipulation(target="gold; metal", anchor="silver", control="none", scale=0.1, enhance=False),
    )
    text = format_manipulation_sequence(groups)
    assert parse_manipulation_sequence(text) == groups
    for g in groups:
        assert parse_manipulation_sequence(format_manipulation_line(g)) == (g,)


def test_parse_fixed_enhance_and_legacy_bug():
    """The original reads saved lines with ``bool(" False")`` == True; fixed by default, reproducible on demand."""
    lines = ORIGINAL_LINE + "\n" + ORIGINAL_LINE.replace("[enhanced] False", "[enhanced] True")
    fixed = parse_manipulation_sequence(lines)
    legacy = parse_manipulation_sequence(lines, legacy_enhance_bug=True)
    assert [g.enhance for g in fixed] == [False, True]
    assert [g.enhance for g in legacy] == [True, True]
    assert [g.enhance for g in parse_manipulation_sequence(ORIGINAL_LINE.replace("False", "false"))] == [False]
    assert fixed[0] == Manipulation(target="red hair", anchor="none", control="hair", scale=2.5)


def test_parse_tolerates_blank_lines_and_integer_numbers():
    text = "\n  \n" + ORIGINAL_LINE.replace("[scale] 2.5", "[scale] 3") + "\n\n"
    (g,) = parse_manipulation_sequence(text)
    assert g.scale == 3.0 and g.thresholds == DEFAULT_THRESHOLDS
    assert parse_manipulation_sequence("") == () and parse_manipulation_sequence(None) == ()


@pytest.mark.parametrize("bad,needle", [
    (ORIGINAL_LINE.replace("; [anchor] none", ""), "[anchor]"),
    (ORIGINAL_LINE.replace("[scale] 2.5", "[scale] lots"), "[scale] 'lots' is not a number"),
    (ORIGINAL_LINE.replace("[enhanced] False", "[enhanced] maybe"), "[enhanced] 'maybe'"),
    (ORIGINAL_LINE.replace("[scale] 2.5", "[scale] 20"), "scale"),
    (ORIGINAL_LINE.replace("[ts1] 0.55", "[ts1] 0.4"), "thresholds"),
    ("red hair, blue eyes", "missing"),
])
def test_parse_malformed_line_names_line_number(bad, needle):
    text = ORIGINAL_LINE + "\n" + bad
    with pytest.raises(InvalidInput) as info:
        parse_manipulation_sequence(text)
    assert info.value.field == "manipulations"
    assert "line 2" in info.value.message
    assert needle in info.value.message


def test_format_rejects_unrepresentable_prompt():
    with pytest.raises(InvalidInput):
        format_manipulation_line(Manipulation(target="a\nb"))
    with pytest.raises(InvalidInput):
        format_manipulation_line(Manipulation(target="x; [anchor] y"))


# ---------------------------------------------------------------------------------- heat map (§7.5)
def test_similarity_map_is_bicubic_resize_of_token_grid():
    """Parity with §7.5: s = P·c on the 16x16 grid, bicubic (align_corners False) to (H, W)."""
    rng = np.random.default_rng(31)
    v = random_tokens(32)
    c = torch.tensor(unit(rng), dtype=torch.float32)
    out = similarity_map(v, c[None], (40, 56))
    assert out.shape == (40, 56) and out.dtype == np.float32
    grid = np.array([dot(p, c.numpy()) for p in v[0, 1:].numpy()]).reshape(16, 16)
    expected = torch.nn.functional.interpolate(torch.tensor(grid)[None, None], size=(40, 56), mode="bicubic",
                                               align_corners=False)[0, 0].numpy()
    assert np.abs(out - expected).max() <= 1e-5


def test_threshold_levels_values_and_counts():
    """Exact parity with §7.5: 63 per threshold reached (m >= th), values {0, 63, 126, 189, 252}."""
    assert HEATMAP_LEVEL == 63 == np.uint8(255 * 0.25)
    sim = np.array([[0.0, 0.49, 0.5, 0.56], [0.6, 0.7, 0.96, 1.0]], dtype=np.float32) * 3.0 - 1.0
    levels = threshold_levels(sim, DEFAULT_THRESHOLDS)
    assert levels.dtype == np.uint8
    assert levels.tolist() == [[0, 0, 63, 126], [126, 189, 252, 252]]
    rng = np.random.default_rng(33)
    big = rng.standard_normal((64, 80)).astype(np.float32)
    levels = threshold_levels(big, DEFAULT_THRESHOLDS)
    assert set(np.unique(levels).tolist()) == LEVELS
    m = (big - big.min()) / (big.max() - big.min())
    expected = sum(np.where(m < np.float32(th), 0, 63) for th in DEFAULT_THRESHOLDS)
    assert np.array_equal(levels, expected.astype(np.uint8))
    assert not threshold_levels(np.full((4, 4), 2.0, np.float32)).any()


def test_render_heatmap_grid_blend_and_size():
    rng = np.random.default_rng(34)
    ref_arr = rng.integers(0, 256, size=(100, 70, 3), dtype=np.uint8)
    reference = Image.fromarray(ref_arr)
    levels = threshold_levels(rng.standard_normal((100, 70)).astype(np.float32))
    out = render_heatmap(reference, levels)
    assert out.size == reference.size and out.mode == "RGB"
    arr = np.asarray(out)
    rows = [i * (100 // 16) for i in range(16)]
    cols = [i * (70 // 16) for i in range(16)]
    assert not arr[rows].any() and not arr[:, cols].any()
    # a pixel off the grid: 0.3 ref + 0.7 JET(level), rounded like cv2.addWeighted
    y, x = 1, 1
    assert y not in rows and x not in cols
    jet = cv2.applyColorMap(np.array([[levels[y, x]]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    expected = np.clip(np.round(0.3 * ref_arr[y, x].astype(np.float64) + 0.7 * jet), 0, 255)
    assert np.abs(arr[y, x].astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ValueError):
        render_heatmap(reference, levels[:50])


def test_limit_heatmap_reference():
    small = Image.new("RGB", (300, 200))
    assert limit_heatmap_reference(small) is small
    assert limit_heatmap_reference(Image.new("RGB", (4100, 64))).size == (4096, int(4096.0 / 4100 * 64))
    assert limit_heatmap_reference(Image.new("RGB", (30, 4200))).size == (int(4096.0 / 4200 * 30), 4096)


def test_manipulation_heatmap_end_to_end_with_fake_encoders():
    enc = FakeTextEncoder()
    seen = {}

    def encode_full(x):
        seen["shape"] = tuple(x.shape)
        seen["range"] = (float(x.min()), float(x.max()))
        return random_tokens(40)

    reference = Image.fromarray(np.random.default_rng(41).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    groups = (Manipulation(target="red", control="hair", scale=2.0),)
    out = manipulation_heatmap(reference, groups, "hair", DEFAULT_THRESHOLDS, encode_full, enc)
    assert out.size == reference.size
    assert seen["shape"] == (1, 3, 96, 128)
    assert -1.0 <= seen["range"][0] and seen["range"][1] <= 1.0
    # expected: the same pipeline spelled out with the public pieces
    tokens = apply_manipulations(random_tokens(40), groups, enc)
    levels = threshold_levels(similarity_map(tokens, torch.from_numpy(enc.vector("hair"))[None], (96, 128)))
    assert np.array_equal(np.asarray(out), np.asarray(render_heatmap(reference, levels)))
    assert set(np.unique(levels).tolist()) <= LEVELS


def test_group_heat_maps_show_each_groups_regions_before_it_is_applied():
    """The gallery / command-line heat maps: group i's control over the tokens after groups 0..i-1 (the
    "Visualize" image while group i is being edited), not the last control after every group."""
    from lib_colorize.manipulation import group_heatmaps, tile_heatmaps

    enc = FakeTextEncoder()
    reference = Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    groups = (Manipulation(target="red", control="hair", scale=6.0),
              Manipulation(target="blue", control="sky", scale=4.0, thresholds=(0.2, 0.4, 0.6, 0.8)))
    maps = group_heatmaps(reference, groups, lambda x: random_tokens(41), enc)
    assert len(maps) == 2
    for i, (group, heatmap) in enumerate(zip(groups, maps)):
        expected = manipulation_heatmap(reference, groups[:i], group.control, group.thresholds,
                                        lambda x: random_tokens(41), enc)
        assert np.array_equal(np.asarray(heatmap), np.asarray(expected)), i
    after_all = manipulation_heatmap(reference, groups, "sky", groups[1].thresholds, lambda x: random_tokens(41), enc)
    assert not np.array_equal(np.asarray(maps[1]), np.asarray(after_all))
    tiled = tile_heatmaps(maps)
    assert tiled.size == (48 * 2 + 8, 32)
    assert np.array_equal(np.asarray(tiled)[:, 56:], np.asarray(maps[1]))
