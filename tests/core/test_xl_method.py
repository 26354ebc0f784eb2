"""The XL method's denoiser call: sketch residuals after input blocks 0, 3, 6, 8 with the four per-level strengths,
``y`` on every row, the three row sets and the four guidance modes, the non-sticky window, and the XL scale groups.

The original (``DualCondUNetXL._forward`` and the CFG denoiser, method-xl §2.3, §5) is restated here from
method-xl.md over the network's blocks, independently of our processors and denoiser; the model is the tiny
``sdxl`` checkpoint in the released layout with a v-prediction k-diffusion wrapper (``CompVisVDenoiser``'s maths).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lib_colorize.checkpoint import load_checkpoint
from lib_colorize.conditioning import encode_sketch_hints, xl_vector
from lib_colorize.denoiser import GenerationPlan, guided_call
from lib_colorize.family import XL
from lib_colorize.guidance import GuidanceWindow, guidance_mode, xl_cross_attention_scales
from lib_colorize.models.unet import timestep_embedding
from lib_colorize.options import LevelScales
from lib_colorize.processors import for_generation
from lib_colorize.schedule import NoiseSchedule, make_denoiser
from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint
from test_guidance_hooks import restated_combine  # the original's combination (method §5.3 = method-xl §5.2)

torch.set_num_threads(1)
CTX = 64
RESIDUAL_AT = (0, 3, 6, 8)   # method-xl §2.3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_xl_checkpoint(tmp_path_factory.mktemp("xl") / "sdxl-tiny.safetensors", "sdxl", seed=11)
    ck = load_checkpoint(path, components=("unet", "sketch_encoder"))
    return ck.unet.eval(), ck.sketch_encoder.eval()


def restated_unet(unet, x, t, context, y, control):
    """``DualCondUNetXL._forward``: emb = time_embed(E(t)) + label_emb(y); after input block i ∈ {0,3,6,8} the
    next residual is added before the skip is stored; the decoder as in SDXL."""
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels)) + unet.label_emb(y)
    hs, h, k = [], x, 0
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb, context)
        if i in RESIDUAL_AT:
            h = h + control[k]
            k += 1
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        h = block(torch.cat([h, hs.pop()], 1), emb, context)
    return unet.out(h)


SCHEDULE = NoiseSchedule.scaled_linear()


def restated_v_denoiser(unet, x, sigma, context, y, control):
    """k-diffusion's CompVisVDenoiser: c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1), c_in = 1/√(σ²+1), t from σ."""
    s = sigma.view(-1, 1, 1, 1)
    t = SCHEDULE.sigma_to_t(sigma)
    v = restated_unet(unet, x / (s ** 2 + 1).sqrt(), t, context, y, control)
    return x / (s ** 2 + 1) + v * (-s / (s ** 2 + 1).sqrt())


def prepared(sketch_encoder, strengths=(1.0, 0.5, 2.0, 1.5), sketch_strength=0.8, seed=3):
    g = torch.Generator().manual_seed(seed)
    sketch = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    with torch.no_grad():
        hints, blank, _ = encode_sketch_hints(sketch_encoder, sketch, sketch_strength, level_strengths=strengths)
        raw = sketch_encoder(torch.cat([sketch, -torch.ones_like(sketch)]))
    tokens = torch.randn(1, 196, CTX, generator=g)
    return sketch, hints, blank, raw, tokens


def restated_rows(mode, tokens, raw, a, window_open):
    """method-xl §5.1: c = (e, sketch residuals), u₀ = (zeros of the same length, sketch residuals),
    u₁ = (e, blank-sketch residuals); outside the window every row's context is one zero token."""
    roles = {0: ["c"], 1: ["c", "u0"], 10: ["c", "u1"], 11: ["c", "u0", "u1"]}[int(mode)]
    ctx, ctl = [], [[] for _ in range(4)]
    for role in roles:
        ctx.append(torch.zeros(1, 1, CTX) if not window_open else
                   torch.zeros_like(tokens) if role == "u0" else tokens)
        for k in range(4):
            ctl[k].append(raw[k][1:2] * a[k] if role == "u1" else raw[k][0:1] * a[k])
    return roles, torch.cat(ctx), [torch.cat(c) for c in ctl]


def our_call(unet, plan, x, sigma, hint_blocks=XL.hint_blocks):
    denoiser = make_denoiser(lambda xi, t, context, y: unet(xi, t, context, y), "v", SCHEDULE)
    inner = lambda xi, si, c, y: denoiser(xi, si, context=c, y=y)
    with for_generation(unet, hint_blocks=hint_blocks) as processors:
        return guided_call(plan, processors, inner, x, sigma, SCHEDULE.sigma_to_t(sigma))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (4.0, 1.0), (1.0, 2.0), (4.0, 1.5)])
def test_one_guided_unet_call_per_guidance_mode_equals_the_restated_original(model, scales):
    unet, encoder = model
    sketch, hints, blank, raw, tokens = prepared(encoder)
    y = xl_vector(128, 128)
    plan = GenerationPlan(mode=guidance_mode(*scales), reference_guidance=scales[0], sketch_guidance=scales[1],
                          reference_tokens=tokens, sketch_hints=hints, blank_hints=blank, vector=y)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 3
    sigma = torch.tensor([2.5, 2.5])
    ours = our_call(unet, plan, x, sigma)
    a = [0.8 * s for s in (1.0, 0.5, 2.0, 1.5)]
    roles, ctx, ctl = restated_rows(plan.mode, tokens, raw, a, True)
    with torch.no_grad():
        per_image = []
        for i in range(2):
            rows = len(roles)
            out = restated_v_denoiser(unet, x[i:i + 1].repeat(rows, 1, 1, 1), sigma[:1].repeat(rows), ctx,
                                      y.expand(rows, -1), ctl)
            per_image.append(restated_combine(out.chunk(rows), roles, *scales))
        expected = torch.cat(per_image)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    # it can fail: the SD2.1 family's residual blocks (after input blocks 0, 3, 6 and then 7), or another y
    with pytest.raises(ValueError):
        our_call(unet, plan, x, sigma, hint_blocks=(0, 3, 6, 9, 11))
    wrong = our_call(unet, plan, x, sigma, hint_blocks=(0, 3, 6, 7))
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()
    other_y = dataclasses.replace(plan, vector=xl_vector(1024, 1024))
    assert (our_call(unet, other_y, x, sigma) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_the_window_zeroes_every_rows_context_for_that_call_only(model):
    unet, encoder = model
    sketch, hints, blank, raw, tokens = prepared(encoder)
    y = xl_vector(128, 128)
    plan = GenerationPlan(mode=guidance_mode(4.0, 1.0), reference_guidance=4.0, sketch_guidance=1.0,
                          reference_tokens=tokens, sketch_hints=hints, blank_hints=blank, vector=y,
                          window=GuidanceWindow(0.3, 1.0, -0.05, -0.05))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    a = [0.8 * s for s in (1.0, 0.5, 2.0, 1.5)]
    for sigma in (14.0, 0.5, 14.0, 0.5):        # τ ≈ 0 (closed), τ > 0.3 (open), closed again, open again
        sigma = torch.tensor([sigma])
        tau = 1 - float(SCHEDULE.sigma_to_t(sigma)) / 999
        ours = our_call(unet, plan, x, sigma)
        roles, ctx, ctl = restated_rows(plan.mode, tokens, raw, a, tau >= 0.3)
        with torch.no_grad():
            out = restated_v_denoiser(unet, x.repeat(2, 1, 1, 1), sigma.repeat(2), ctx, y.expand(2, -1), ctl)
        expected = restated_combine(out.chunk(2), roles, 4.0, 1.0)
        assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max(), tau


def test_xl_scale_groups():
    levels = LevelScales(encoder=0.4, middle=0.9, low=0.6)
    assert xl_cross_attention_scales("sdxl", 0.5, levels) == [0.2] * 70           # one global E·S
    v2 = xl_cross_attention_scales("xlv2", 0.5, levels)
    assert v2[:4] == [0.2] * 4 and v2[4:24] == [0.3] * 20 and v2[34:64] == [0.3] * 30
    assert v2[24:34] == [1.0] * 10 and v2[64:] == [1.0] * 6                         # never scaled, reset to 1
    assert 0.45 not in v2                                                            # middle ignored
    with pytest.raises(ValueError):
        xl_cross_attention_scales("v1", 0.5, levels)


@pytest.mark.parametrize("version", ["sdxl", "xlv2"])
def test_xl_scales_multiply_the_attention_before_its_output_projection(model, version):
    unet, _ = model
    scales = xl_cross_attention_scales(version, 0.7, LevelScales(encoder=0.5, low=0.25))
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for s, block in zip(scales, reference.transformer_blocks()):
            block.attn2.to_out[0].weight.mul_(s)          # W (s a) + b = (s W) a + b
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ctx = torch.randn(1, 196, CTX, generator=torch.Generator().manual_seed(8))
    t, y = torch.tensor([400.0]), xl_vector(128, 128)
    with torch.no_grad(), for_generation(unet, layer_scales=scales, hint_blocks=XL.hint_blocks):
        ours = unet(x, t, ctx, y)
    with torch.no_grad():
        expected = reference(x, t, ctx, y)
        plain = unet(x, t, ctx, y)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (plain - expected).abs().max() > 1e-3 * expected.abs().max()      # it can fail: the scales matter
