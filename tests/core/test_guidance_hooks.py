"""Parity of guidance, U-Net hooks, attention injection and the denoiser call with the original's maths.

The original implementation cannot be imported in CI (it needs xformers, CUDA patches and a dozen packages), so
its maths is restated here from ../shared/docs/method.md, written independently of our code:

* the U-Net loop with hints added after input blocks 0, 3, 6, 9, 11 (method §3);
* cross-attention scaling as a scaled output projection weight (§4.2: ``W (s a) + b = (s W) a + b``);
* the four guidance modes and the combination formula (§5.2, §5.3), the guidance window (§5.4);
* attention injection: the original's full-batch reference pass with row-specific contexts and its hacked
  transformer-block forward with the bank and φ blending on the reference-dropped rows (§6.2, §6.3).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_colorize.denoiser import GenerationPlan, InjectionPlan, guided_call
from lib_colorize.guidance import (COND, REF_DROPPED, SKETCH_DROPPED, GuidanceMode, GuidanceWindow, combine,
                                   cross_attention_scales, guidance_mode, progress, reference_window_open)
from lib_colorize.processors import (ProcessorSet, ReferenceBankRead, ReferenceBankWrite, SketchHints, UNetCall,
                                     for_generation, live_count, remove_all)

from bench.original import original_guided_call, original_processors
from lib_colorize.models.unet import UNetConfig, UNetModel, timestep_embedding
from lib_colorize.options import LevelScales

CTX = 16
HINT_AT = (0, 3, 6, 9, 11)


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(UNetConfig(model_channels=32, context_dim=CTX)).eval()
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
            elif hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
                module.weight.normal_(0.0, 0.08)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.05)
    return unet


def hint_shapes(unet, latent=(16, 16)):
    shapes = {}
    handles = [unet.input_blocks[i].register_forward_hook(
        lambda m, a, o, i=i: shapes.__setitem__(i, o.shape[1:])) for i in HINT_AT]
    unet(torch.zeros(1, 4, *latent), torch.tensor([10.0]), torch.zeros(1, 4, CTX))
    for h in handles:
        h.remove()
    return [shapes[i] for i in HINT_AT]


def random_hints(unet, seed, latent=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, *s, generator=g) for s in hint_shapes(unet, latent)]


def restated_unet(unet, x, t, context, hints):
    """Method §3: ``h = block(h); if idx in [0,3,6,9,11]: h = h + hint; hs.append(h)``, then SD's decoder."""
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    hs, h, k = [], x, 0
    for idx, block in enumerate(unet.input_blocks):
        h = block(h, emb, context)
        if idx in HINT_AT and hints is not None:
            h = h + hints[k]
            k += 1
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return unet.out(h)


# --------------------------------------------------------------------------- guidance maths
def test_guidance_mode_thresholds_are_strictly_greater_than_one():
    assert guidance_mode(1.0, 1.0) == GuidanceMode.NONE
    assert guidance_mode(1.0001, 1.0) == GuidanceMode.REFERENCE
    assert guidance_mode(1.0, 3.0) == GuidanceMode.SKETCH
    assert guidance_mode(5.0, 2.0) == GuidanceMode.BOTH
    assert guidance_mode(0.5, 0.5) == GuidanceMode.NONE


def test_combine_matches_the_four_formulas():
    g = torch.Generator().manual_seed(1)
    c, u0, u1 = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = {COND: c, REF_DROPPED: u0, SKETCH_DROPPED: u1}
    assert torch.equal(combine(out, GuidanceMode.NONE, 5, 2), c)
    assert torch.allclose(combine(out, GuidanceMode.REFERENCE, 5, 2), u0 + 5 * (c - u0), atol=1e-12)
    assert torch.allclose(combine(out, GuidanceMode.SKETCH, 5, 2), u1 + 2 * (c - u1), atol=1e-12)
    both = 0.5 * ((u0 + 5 * (c - u0)) + (u1 + 2 * (c - u1)))
    assert torch.allclose(combine(out, GuidanceMode.BOTH, 5, 2), both, atol=1e-12)
    # with g_s = 1 the "both" formula is NOT plain reference CFG: mode selection must skip it
    assert not torch.allclose(combine(out, GuidanceMode.BOTH, 5, 1), combine(out, GuidanceMode.REFERENCE, 5, 1))


@pytest.mark.parametrize("t,expected", [(999.0, 0.0), (0.0, 1.0), (499.5, 0.5), (749.25, 0.25)])
def test_progress_from_fractional_timesteps(t, expected):
    assert progress(torch.tensor([t, 3.0])) == pytest.approx(expected, abs=1e-6)


def test_guidance_window_bounds_and_reopening():
    # start 0.2, end 0.8: closed before 0.2 and after 0.8, open at the edges (≤ / ≥ are open)
    assert not reference_window_open(0.19, 0.2, 0.8, -0.05, -0.05)
    assert reference_window_open(0.2, 0.2, 0.8, -0.05, -0.05)
    assert reference_window_open(0.8, 0.2, 0.8, -0.05, -0.05)
    assert not reference_window_open(0.81, 0.2, 0.8, -0.05, -0.05)
    # no-guidance window [0.4, 0.5] closes inclusively and re-opens after (mid-2024 non-sticky semantics)
    seq = [reference_window_open(tau, 0.0, 1.0, 0.4, 0.5) for tau in (0.3, 0.4, 0.45, 0.5, 0.55)]
    assert seq == [True, False, False, False, True]
    assert all(reference_window_open(tau, 0.0, 1.0, -0.05, -0.05) for tau in (0.0, 0.5, 1.0))


def test_level_control_table_and_unassigned_blocks():
    scales = cross_attention_scales(0.5, LevelScales(encoder=0.2, middle=0.4, low=0.8))
    expected = [0.1, 0.1, 0.2, 0.2, 0.4, 0.4, 1.0, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0]
    assert scales == pytest.approx(expected)


def test_accurate_control_maps_slider_k_to_block_k():
    values = [i / 20 for i in range(16)]
    assert cross_attention_scales(0.3, LevelScales(), values) == pytest.approx(values)


# --------------------------------------------------------------------------- hooks
def test_hint_hooks_equal_restated_unet_loop_and_skip_connections():
    unet = tiny_unet()
    hints = random_hints(unet, 2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 5, CTX, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), for_generation(unet) as processors, processors.call(UNetCall(sketch_hints=hints)):
        ours = unet(x, t, ctx)
    with torch.no_grad():
        expected = restated_unet(unet, x, t, ctx, [h.expand(2, -1, -1, -1) for h in hints])
    scale = expected.abs().max()
    assert (ours - expected).abs().max() <= 1e-4 * scale
    assert not torch.allclose(ours, unet(x, t, ctx)), "hints must change the output"


def test_cross_attention_scale_equals_scaled_output_projection_and_zero_leaves_bias():
    unet = tiny_unet()
    scales = [0.0 if i == 4 else (0.5 if i % 2 else 1.0) for i in range(16)]
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for s, block in zip(scales, [m for m in reference.modules() if hasattr(m, "attn2") and hasattr(m, "ff")]):
            block.attn2.to_out[0].weight.mul_(s)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ctx = torch.randn(1, 7, CTX, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([321.0])
    with torch.no_grad(), for_generation(unet, layer_scales=scales):
        ours = unet(x, t, ctx)
    expected = reference(x, t, ctx)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
    # s = 0: attn2's residual is exactly its to_out bias
    block = [m for m in unet.modules() if hasattr(m, "attn2") and hasattr(m, "ff")][4]
    with for_generation(unet, layer_scales=scales):
        out = block.attn2(torch.randn(1, 9, block.attn2.to_q.in_features), context=ctx)
    assert torch.allclose(out, block.attn2.to_out[0].bias.expand_as(out), atol=1e-6)


def test_hooks_are_removed_on_exception_and_output_is_bit_identical():
    unet = tiny_unet()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 3, CTX)
    before = unet(x, t, ctx)
    with pytest.raises(RuntimeError, match="boom"):
        with for_generation(unet, layer_scales=[0.3] * 16, injection=True) as processors, \
                processors.call(UNetCall(sketch_hints=random_hints(unet, 1))):
            assert live_count() == 1
            raise RuntimeError("boom")
    assert live_count() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert torch.equal(unet(x, t, ctx), before)


def test_remove_all_hooks_self_heals_leftovers():
    unet = tiny_unet()
    for_generation(unet, layer_scales=[0.5] * 16).install()
    assert live_count() == 1
    assert remove_all() == 1
    assert live_count() == 0
    assert not any(m._forward_pre_hooks for m in unet.modules())


# --------------------------------------------------------------------------- denoiser + injection
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()


def q_sample(latent, t, noise):
    a = ALPHAS[int(round(float(t.reshape(-1)[0])))]
    return a.sqrt() * latent + (1 - a).sqrt() * noise


def make_plan(unet, mode_scales, injection=None, window=(0.0, 1.0, -0.05, -0.05), seed=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, 12, CTX, generator=g)
    g_r, g_s = mode_scales
    return GenerationPlan(mode=guidance_mode(g_r, g_s), reference_guidance=g_r, sketch_guidance=g_s,
                          reference_tokens=tokens, sketch_hints=random_hints(unet, seed + 1),
                          blank_hints=random_hints(unet, seed + 2), window=GuidanceWindow(*window),
                          injection=injection)


def restated_rows(plan, bs, window_open):
    """Method §5.1/§5.2: block-wise rows [c×bs, u0×bs, u1×bs]; zero context of the same token count for u0;
    one zero token for every row outside the window (§5.4)."""
    roles = {GuidanceMode.NONE: ["c"], GuidanceMode.REFERENCE: ["c", "u0"], GuidanceMode.SKETCH: ["c", "u1"],
             GuidanceMode.BOTH: ["c", "u0", "u1"]}[plan.mode]
    ctx, hints = [], [[] for _ in range(5)]
    for role in roles:
        for _ in range(bs):
            if not window_open:
                ctx.append(torch.zeros(1, 1, CTX))
            else:
                ctx.append(torch.zeros_like(plan.reference_tokens) if role == "u0" else plan.reference_tokens)
            for k in range(5):
                hints[k].append(plan.blank_hints[k] if role == "u1" else plan.sketch_hints[k])
    return roles, torch.cat(ctx), [torch.cat(h) for h in hints]


def restated_combine(outs, roles, g_r, g_s):
    d = dict(zip(roles, outs))
    if roles == ["c"]:
        return d["c"]
    if roles == ["c", "u0"]:
        return d["u0"] + g_r * (d["c"] - d["u0"])
    if roles == ["c", "u1"]:
        return d["u1"] + g_s * (d["c"] - d["u1"])
    return 0.5 * (d["u0"] + g_r * (d["c"] - d["u0"]) + d["u1"] + g_s * (d["c"] - d["u1"]))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (5.0, 1.0), (1.0, 2.5), (4.0, 1.5)])
@pytest.mark.parametrize("batch_together", [True, False])
def test_guided_call_equals_restated_dual_guidance(scales, batch_together):
    unet = tiny_unet()
    plan = make_plan(unet, scales)
    bs = 2
    x = torch.randn(bs, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    t = torch.full((bs,), 600.0)
    with for_generation(unet) as processors:
        ours = guided_call(plan, processors, lambda xi, si, c: unet(xi, si, c), x, t, t,
                           batch_together=batch_together)
    roles, ctx, hints = restated_rows(plan, bs, True)
    with torch.no_grad():
        out = restated_unet(unet, x.repeat(len(roles), 1, 1, 1), t.repeat(len(roles)), ctx, hints)
    expected = restated_combine(out.chunk(len(roles)), roles, *scales)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert plan.stats["unet_rows"] == bs * len(roles)


def test_guidance_window_is_recomputed_per_call_never_sticky():
    unet = tiny_unet()
    plan = make_plan(unet, (5.0, 1.0), window=(0.5, 1.0, -0.05, -0.05))
    x = torch.randn(1, 4, 16, 16)
    model = lambda xi, si, c: unet(xi, si, c)
    with for_generation(unet) as processors:
        closed = guided_call(plan, processors, model, x, torch.tensor([900.0]), 900.0)   # τ ≈ 0.1 < 0.5
        opened = guided_call(plan, processors, model, x, torch.tensor([100.0]), 100.0)   # τ ≈ 0.9: reference back
    for t, ours, window_open in ((900.0, closed, False), (100.0, opened, True)):
        roles, ctx, hints = restated_rows(plan, 1, window_open)
        with torch.no_grad():
            out = restated_unet(unet, x.repeat(2, 1, 1, 1), torch.full((2,), t), ctx, hints)
        expected = restated_combine(out.chunk(2), roles, 5.0, 1.0)
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert plan.reference_tokens.abs().sum() > 0, "the plan's context must not be overwritten"


def restated_injection_step(unet, plan, x, t, latent, noise, inj_hints, phi, start):
    """The original algorithm (method §6.2-§6.3) with its full-batch reference pass."""
    bs = x.shape[0]
    tau = 1 - float(t[0]) / 999
    window_open = plan.window.is_open(tau)
    roles, ctx, hints = restated_rows(plan, bs, window_open)
    rows = bs * len(roles)
    gr = list(range(bs, 2 * bs)) if "u0" in roles else []
    blocks = [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "ff")]
    state = {"mode": None}
    banks = {i: [] for i in range(len(blocks))}

    def hacked(block, i):
        def forward(h, context=None):
            n = block.norm1(h)
            if state["mode"] == "write":
                banks[i].append(n)
                sa = block.attn1(n, context=n)
            elif banks[i]:
                sa_inj = block.attn1(n, context=torch.cat([n, banks[i][0]], dim=1))
                sa_c = sa_inj.clone()
                if gr and phi > 1e-5:
                    sa_c[gr] = block.attn1(n[gr], context=n[gr])
                sa = phi * sa_c + (1 - phi) * sa_inj
                banks[i].clear()
            else:
                sa = block.attn1(n, context=n)
            h = h + sa
            h = h + block.attn2(block.norm2(h), context=context)
            return h + block.ff(block.norm3(h))
        return forward

    for i, b in enumerate(blocks):
        b.forward = hacked(b, i)
    try:
        with torch.no_grad():
            if tau >= start:
                state["mode"] = "write"
                x_ref = q_sample(latent, t, noise).expand(rows, -1, -1, -1)
                ref_hints = [h.expand(rows, -1, -1, -1) for h in inj_hints] if inj_hints is not None else None
                restated_unet(unet, x_ref, t[:1].expand(rows), ctx, ref_hints)
            state["mode"] = "read"
            out = restated_unet(unet, x.repeat(len(roles), 1, 1, 1), t[:1].expand(rows), ctx, hints)
    finally:
        for b in blocks:
            del b.forward
    return restated_combine(out.chunk(len(roles)), roles, plan.reference_guidance, plan.sketch_guidance)


@pytest.mark.parametrize("scales,bs,kappa,full_batch", [
    ((5.0, 1.0), 1, 0.0, False), ((5.0, 1.0), 2, 0.7, False), ((4.0, 2.0), 2, 0.5, False),
    ((1.0, 2.0), 1, 0.0, False), ((1.0, 1.0), 2, 0.3, False), ((4.0, 2.0), 2, 0.5, True)])
def test_injection_step_equals_original_full_batch_algorithm(scales, bs, kappa, full_batch):
    unet = tiny_unet(3)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    inj_hints = [h * kappa for h in random_hints(unet, 12)] if kappa else None
    # every image with the reference latent and ε stream of the original's single draw (seed 99)
    injection = InjectionPlan(reference_latents=latent.expand(bs, -1, -1, -1), hints=inj_hints,
                              noise_generators=[torch.Generator().manual_seed(99) for _ in range(bs)],
                              reference_fidelity=0.6, start=0.0)
    plan = make_plan(unet, scales, injection=injection)
    x = torch.randn(bs, 4, 16, 16, generator=torch.Generator().manual_seed(13))
    t = torch.full((bs,), 700.0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(99))
    expected = restated_injection_step(unet, plan, x, t, latent, noise, inj_hints, 0.6, 0.0)
    # full_batch: the benchmark's restatement of the original (bench/original.py) must agree with this one
    make_processors, call = ((original_processors, original_guided_call) if full_batch
                             else (for_generation, guided_call))
    with make_processors(unet, injection=True) as processors:
        ours = call(plan, processors, lambda xi, si, c: unet(xi, si, c), x, t, t,
                    noised_reference=lambda r, s, n: q_sample(r, s, n))
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    distinct_rows = 1 if plan.mode in (GuidanceMode.NONE, GuidanceMode.SKETCH) else 2
    assert plan.stats["write_rows"] == (bs * len(plan.roles) if full_batch else distinct_rows * bs)
    # without injection the result differs (the test can fail)
    plain = make_plan(unet, scales)
    with for_generation(unet) as processors:
        no_inj = guided_call(plain, processors, lambda xi, si, c: unet(xi, si, c), x, t, t)
    assert not torch.allclose(ours, no_inj, atol=1e-6)


def test_injection_start_gates_the_reference_pass_and_unbatched_calls_agree():
    unet = tiny_unet(4)
    latent = torch.randn(1, 4, 16, 16)
    make = lambda: make_plan(unet, (4.0, 2.0), injection=InjectionPlan(
        reference_latents=latent, hints=None, noise_generators=[torch.Generator().manual_seed(5)],
        reference_fidelity=0.5, start=0.5))
    x = torch.randn(1, 4, 16, 16)
    model = lambda xi, si, c: unet(xi, si, c)
    early, late = torch.tensor([900.0]), torch.tensor([200.0])   # τ 0.1 (< start) and 0.8
    results = {}
    for together in (True, False):
        plan = make()
        with for_generation(unet, injection=True) as processors:
            results[(together, "early")] = guided_call(plan, processors, model, x, early, early,
                                                       noised_reference=q_sample, batch_together=together)
            assert plan.stats["write_rows"] == 0
            results[(together, "late")] = guided_call(plan, processors, model, x, late, late,
                                                      noised_reference=q_sample, batch_together=together)
            assert plan.stats["write_rows"] == 2
    plain = make_plan(unet, (4.0, 2.0))
    with for_generation(unet) as processors:
        no_inj_early = guided_call(plain, processors, model, x, early, early)
    assert torch.allclose(results[(True, "early")], no_inj_early, atol=1e-6)
    for phase in ("early", "late"):
        together, separate = results[(True, phase)], results[(False, phase)]
        assert (together - separate).abs().max() <= 1e-4 * together.abs().max()


class WriteThrough(ReferenceBankWrite):
    """The reference pass through the whole U-Net (the original's way)."""

    stops_after_last_block = False


def test_write_pass_stops_after_the_last_bank_entry_with_the_same_result():
    unet = tiny_unet(5)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(21))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(22))
    t = torch.full((2,), 400.0)
    results, out_calls = {}, {}
    for early in (False, True):
        plan = make_plan(unet, (4.0, 2.0), injection=InjectionPlan(
            reference_latents=latent.expand(2, -1, -1, -1), hints=None,
            noise_generators=[torch.Generator().manual_seed(1) for _ in range(2)], reference_fidelity=0.6))
        calls = []
        handle = unet.out.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        writer = ReferenceBankWrite() if early else WriteThrough()
        with ProcessorSet(unet, [SketchHints(), writer, ReferenceBankRead()]) as processors:
            results[early] = guided_call(plan, processors, lambda xi, si, c: unet(xi, si, c), x, t, t,
                                         noised_reference=q_sample)
        handle.remove()
        out_calls[early] = calls
    assert torch.equal(results[False], results[True])
    # per image of the batch of 2: its write pass (2 distinct rows), then its 3 main rows
    assert out_calls[False] == [2, 3, 2, 3] and out_calls[True] == [3, 3], \
        "the write pass never reaches the output layer"


def test_closed_window_evaluates_the_reference_dropped_rows_once():
    unet = tiny_unet()
    plan = make_plan(unet, (5.0, 2.0), window=(0.5, 1.0, -0.05, -0.05))
    x = torch.randn(2, 4, 16, 16)
    with for_generation(unet) as processors:
        closed = guided_call(plan, processors, lambda xi, si, c: unet(xi, si, c), x, torch.full((2,), 900.0),
                             900.0)
    assert plan.stats["unet_rows"] == 4, "c and u_sketch only: u_ref equals c outside the window"
    roles, ctx, hints = restated_rows(plan, 2, False)
    with torch.no_grad():
        out = restated_unet(unet, x.repeat(3, 1, 1, 1), torch.full((6,), 900.0), ctx, hints)
    expected = restated_combine(out.chunk(3), roles, 5.0, 2.0)
    assert (closed - expected).abs().max() <= 1e-4 * expected.abs().max()
