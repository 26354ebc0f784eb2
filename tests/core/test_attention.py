"""The merged attention of the reference-dropped rows (our cheaper attention injection) equals the original's
two attentions (method §6.3).

The expected values are computed the original's way: the attention module called twice, once over the row's own
tokens and once over ``[own ; bank]``, blended by φ after the output projection.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_colorize import attention
from lib_colorize.attention import attention_math, attention_with_lse, blended_self_attention, select_kernel, \
    union_weight
from lib_colorize.denoiser import InjectionPlan, guided_call
from lib_colorize.processors import ProcessorSet, ReferenceBankRead, ReferenceBankWrite, SketchHints
from lib_colorize.models.unet import CrossAttention

from test_guidance_hooks import make_plan, q_sample, tiny_unet


def qkv(batch=2, heads=3, n=50, m=70, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d, generator=g).mul(2.0).to(dtype) for length in (n, m, m)]


def test_exact_formula_matches_sdpa_and_logsumexp_across_query_chunks(monkeypatch):
    q, k, v = qkv()
    scale = 16 ** -0.5
    want = F.scaled_dot_product_attention(q, k, v)
    want_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1)
    monkeypatch.setattr(attention, "_SCORE_CHUNK_ELEMENTS", 2 * 3 * 70 * 7)   # 7 queries per chunk: 8 chunks
    out, lse = attention_math(q, k, v, scale)
    assert out.shape == want.shape and lse.shape == (2, 3, 50)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_kernel_returns_output_and_logsumexp_of_the_formula(dtype):
    q, k, v = qkv(dtype=dtype, seed=1)
    out, lse = attention_with_lse(q, k, v)
    want, want_lse = attention_math(q, k, v, 16 ** -0.5)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.allclose(out.float(), want.float(), atol=tolerance)
    assert torch.allclose(lse, want_lse, atol=tolerance)


def test_kernel_selection_falls_back_to_the_formula_when_a_kernel_disagrees_or_raises(monkeypatch):
    def wrong(q, k, v, scale):            # right shapes, wrong values (e.g. a log base-2 lse)
        out, lse = attention_math(q, k, v, scale)
        return out, lse / 0.6931

    def raises(q, k, v, scale):
        raise RuntimeError("no kernel for this input")

    monkeypatch.setattr(attention, "_FUSED_KERNELS", (("raises", raises), ("wrong", wrong)))
    monkeypatch.setattr(attention, "_selected", {})
    name, kernel = select_kernel(torch.device("cpu"), torch.float32, 16)
    assert name == "math" and kernel is attention_math
    monkeypatch.setattr(attention, "_FUSED_KERNELS", (("raises", raises), ("exact", attention_math)))
    monkeypatch.setattr(attention, "_selected", {})
    assert select_kernel(torch.device("cpu"), torch.float32, 16)[0] == "exact"
    assert select_kernel(torch.device("meta"), torch.float32, 16)[0] == "math"   # FLOP counting


def kernel_failing_above(queries: int, message: str):
    """A fused kernel that passes selection (small input) but raises ``message`` on more than ``queries``."""
    def kernel(q, k, v, scale):
        if q.shape[-2] > queries:
            raise RuntimeError(message)
        return attention_math(q, k, v, scale)
    return kernel


def test_a_kernel_failing_on_a_real_shape_falls_back_to_the_formula_but_memory_errors_propagate(monkeypatch):
    q, k, v = qkv(n=150, m=150, seed=5)
    monkeypatch.setattr(attention, "_FUSED_KERNELS",
                        (("small_only", kernel_failing_above(100, "unsupported sequence length")),))
    monkeypatch.setattr(attention, "_selected", {})
    out, lse = attention_with_lse(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert select_kernel(torch.device("cpu"), torch.float32, 16)[0] == "math"

    monkeypatch.setattr(attention, "_FUSED_KERNELS",
                        (("oom", kernel_failing_above(100, "CUDA out of memory. Tried to allocate 2.00 GiB")),))
    monkeypatch.setattr(attention, "_selected", {})
    with pytest.raises(RuntimeError, match="out of memory"):
        attention_with_lse(q, k, v)


def test_attention_over_a_union_of_keys_is_the_logsumexp_weighted_mean():
    q, k, v = qkv(m=40, seed=2)
    k2, v2 = qkv(m=60, seed=3)[1:]
    joint = F.scaled_dot_product_attention(q, torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2))
    out_a, lse_a = attention_with_lse(q, k, v)
    out_b, lse_b = attention_with_lse(q, k2, v2)
    w = union_weight(lse_a, lse_b)
    assert torch.allclose(w * out_a + (1 - w) * out_b, joint, atol=1e-5)


def original_blend(attn, hidden, bank, phi):
    """Method §6.3: ``φ·attn1(n, n) + (1 − φ)·attn1(n, [n ; bank])``."""
    plain = attn(hidden, context=hidden)
    injected = attn(hidden, context=torch.cat([hidden, bank], dim=1))
    return phi * plain + (1 - phi) * injected


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("heads", [1, 4])
def test_blended_self_attention_equals_the_two_attentions_of_the_original(phi, heads):
    torch.manual_seed(heads)
    attn = CrossAttention(32, heads=heads, dim_head=32 // heads).eval()
    hidden, bank = torch.randn(2, 64, 32) * 2, torch.randn(2, 64, 32) * 2
    with torch.no_grad():
        ours = blended_self_attention(attn, hidden, bank, phi)
        want = original_blend(attn, hidden, bank, phi)
        other = original_blend(attn, hidden, torch.randn(2, 64, 32), phi)
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max()
    if phi < 1.0:   # the bank matters (the test can fail)
        assert not torch.allclose(want, other, atol=1e-4)


def test_blended_self_attention_in_half_precision():
    """bfloat16 (what the webui runs on CPUs that support it): same result as the original's two calls in
    bfloat16, within bfloat16 rounding of the float32 result."""
    torch.manual_seed(3)
    attn = CrossAttention(64, heads=1, dim_head=64).eval()
    hidden, bank = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    with torch.no_grad():
        exact = original_blend(attn, hidden, bank, 0.5)
        attn16 = attn.to(torch.bfloat16)
        ours = blended_self_attention(attn16, hidden.bfloat16(), bank.bfloat16(), 0.5)
        theirs = original_blend(attn16, hidden.bfloat16(), bank.bfloat16(), 0.5)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= 2 * (theirs.float() - exact).abs().max() + 1e-2


def test_ldm_style_module_with_its_own_scale_and_kernel():
    class LdmAttention(torch.nn.Module):   # ldm's CrossAttention: ``scale`` attribute, einsum kernel
        def __init__(self, dim=24, heads=3):
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
            self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0))

        def forward(self, x, context=None):
            context = x if context is None else context
            b, n, c = x.shape
            split = lambda t: t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
            q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
            sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
            out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, c))

    attn = LdmAttention().eval()
    hidden, bank = torch.randn(1, 30, 24), torch.randn(1, 30, 24)
    with torch.no_grad():
        assert torch.allclose(blended_self_attention(attn, hidden, bank, 0.5), original_blend(attn, hidden, bank, 0.5),
                              atol=1e-5)


def injection_plan(unet, phi):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(31))
    return make_plan(unet, (4.0, 2.0), injection=InjectionPlan(
        reference_latents=latent.expand(2, -1, -1, -1), hints=None, reference_fidelity=phi,
        noise_generators=[torch.Generator().manual_seed(3) for _ in range(2)]))


class UnmergedRead(ReferenceBankRead):
    """The reference-dropped rows' plain self-attention computed separately (the original's way)."""

    merges_blended_rows = False


class WriteThrough(ReferenceBankWrite):
    """The reference pass through the whole U-Net, so the probes see every block of it."""

    stops_after_last_block = False


@pytest.mark.parametrize("phi", [0.5, 1.0])
def test_read_pass_leaves_the_reference_dropped_rows_out_of_the_module_call(phi):
    unet = tiny_unet(8)
    attn1 = [m.attn1 for m in unet.modules() if hasattr(m, "attn1")]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.full((2,), 500.0)
    results, rows_seen = {}, {}
    for merge in (False, True):
        seen = []
        plan = injection_plan(unet, phi)
        reader = ReferenceBankRead() if merge else UnmergedRead()
        with ProcessorSet(unet, [SketchHints(), WriteThrough(), reader]) as hooks:
            # registered after ours: sees the call as the module runs it
            probes = [a.register_forward_pre_hook(lambda m, args, kw: seen.append(
                (args[0] if args else kw["x"]).shape[0]), with_kwargs=True) for a in attn1]
            results[merge] = guided_call(plan, hooks, lambda xi, si, c: unet(xi, si, c), x, t, t,
                                         noised_reference=q_sample)
            for probe in probes:
                probe.remove()
        rows_seen[merge] = seen
    blocks = len(attn1)
    # per image of the batch of 2: its write pass (2 distinct rows), then its read pass (3 roles)
    assert rows_seen[False] == ([2] * blocks + [3] * blocks) * 2
    assert rows_seen[True] == ([2] * blocks + [2] * blocks) * 2, "the u_ref row (1 of 3) left the module call"
    assert (results[True] - results[False]).abs().max() <= 1e-4 * results[False].abs().max()
