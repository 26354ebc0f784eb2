"""The enhance modes against the original's maths, restated here from ../shared/docs/method-enhance.md.

The original cannot run in CI (xformers, CUDA, its own ldm); its maths is written out below independently of our
code, on random weights in the released key layout (tiny sizes):

* the building blocks (§3.1 threshold and size embeddings, §3.4 ClusterTransformer, §3.5 UNetEncoder hints,
  §3.6 warp and style modulation), as explicit matrix products;
* the split cross-attention of §3.3 per block with the LoRA of §3.2, β_f, β_b, μ, ``s_ℓ`` and the tie rule (Q8);
* ``prepare_conditions`` of each version and mode (§5-§7: contexts, LoRA flags, encoder inputs, Q3, Q5, Q17) and
  the original's ``enhanced_forward`` U-Net with the row groups of §8.1, for ONE guided denoiser call per mode.

Each comparison also checks that the mode changes the output (the test can fail).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_colorize import enhance
from lib_colorize.cache import ContentCache
from lib_colorize.checkpoint import load_checkpoint, load_enhance_modules
from lib_colorize.conditioning import build_plan
from lib_colorize.denoiser import guided_call
from lib_colorize.models.enhance import size_embedding
from lib_colorize.models.unet import ResBlock, SpatialTransformer
from lib_colorize.options import ColorizeOptions
from lib_colorize.processors import (ProcessorSet, SplitAttention, SplitCrossAttention, SplitLoRAHooks, UNetCall,
                                     CrossAttentionScale, for_generation, transformer_blocks)
from lib_colorize.testing.checkpoints import make_checkpoint

CTX = 64          # tiny context width (= the tiny ClusterTransformer's width)
N_TOKENS = 16     # reference tokens (= the tiny ClusterTransformer's token length)
LATENT = (8, 8)
SIZE = (64, 64)
TAU_S = 0.5       # a threshold the test mask hits exactly (the tie rule)
#: method-enhance §3.3: the block factor f_ℓ of the 16 attn2 layers
FACTOR = {**{i: 1.0 for i in (0, 1, 13, 14, 15)}, **{i: 0.5 for i in (2, 3, 10, 11, 12)},
          **{i: 0.25 for i in (4, 5, 7, 8, 9)}, 6: 0.125}
HINT_AT = (0, 3, 6, 9, 11)
LATENT_SCALE = 0.18215


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    out = {}
    parts = {"v1": (), "v1.5": ("lora", "thresh_embedder", "cluster_transformer"),
             "v2": ("lora", "warp_modules", "style_modules", "bg_encoder", "style_encoder")}
    for version, name in (("v1", "mult-eps"), ("v1.5", "switch-eps"), ("v2", "v2-full")):
        path = make_checkpoint(folder / f"{name}.safetensors", version=version, size="tiny", context_dim=CTX, seed=3)
        loaded = load_checkpoint(path, components=("unet", "vae"))
        modules = load_enhance_modules(path, parts[version]) if parts[version] else None
        out[version] = (loaded.unet, loaded.vae.float(), modules)
    return out


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sketch_latent_mask():
    """(1, 1, 8, 8): character on the left, background on the right, a column exactly at τ_s (ties)."""
    m = torch.zeros(1, 1, *LATENT)
    m[..., :3] = 1.0
    m[..., 3] = TAU_S
    return m


# --------------------------------------------------------------------------------- restated building blocks
def sinusoid(values, dim):
    """σ_dim(r) = [cos(r f_k), sin(r f_k)], f_k = exp(−ln(10⁴) k / (dim/2))."""
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = torch.as_tensor(values, dtype=torch.float64).reshape(-1, 1) * f
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def lin(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def attention(q, k, v, heads):
    """Per-head softmax(q kᵀ/√d) v with explicit products."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).permute(0, 2, 1, 3).reshape(b, n, inner)


def layer_norm(x, norm):
    return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)


def restated_threshold_embedding(embedder, taus):
    l0, l2 = embedder.embed_layer[0], embedder.embed_layer[2]
    s = sinusoid(taus, l0.weight.shape[1])
    return lin(F.silu(lin(s, l0)), l2).unsqueeze(1)


def restated_cluster_transformer(ct, tokens):
    q = ct.embedding.unsqueeze(0)
    for norm1, norm2, attn, mlp in ct.layers:
        n = layer_norm(q, norm1)
        heads = attn.to_q.weight.shape[0] // 64 or 1
        q = q + lin(attention(lin(n, attn.to_q), lin(tokens, attn.to_k), lin(tokens, attn.to_v), heads),
                    attn.to_out[0])
        q = q + lin(F.silu(lin(layer_norm(q, norm2), mlp[0])), mlp[2])
    return q


def restated_warp(warp, x, tokens):
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    heads = max(1, c // 64)
    n = layer_norm(t, warp.norm1)
    t = t + lin(attention(lin(n, warp.attn.to_q), lin(tokens, warp.attn.to_k), lin(tokens, warp.attn.to_v), heads),
                warp.attn.to_out[0])
    t = t + lin(F.silu(lin(layer_norm(t, warp.norm2), warp.ff[0])), warp.ff[2])
    return t.transpose(1, 2).reshape(b, c, h, w)


def restated_style(style, modulation, emb, h):
    s = modulation + lin(emb, style[1])
    gamma, beta = lin(layer_norm(s, style[0]), style[2]).chunk(2, dim=1)
    return h * (1 + gamma[..., None, None]) + beta[..., None, None]


def restated_encoder(encoder, z, y, context):
    """UNetEncoder (§3.5): emb = time_embed(σ(0)) + label_emb(y); hint after each input block; reversed."""
    mc = encoder.config.model_channels
    emb = encoder.time_embed(sinusoid([0.0] * z.shape[0], mc))
    le = encoder.label_emb[0]
    emb = emb + lin(F.silu(lin(y, le[0])), le[2])
    h, hints = z, []
    for zero, block in zip(encoder.zero_layers, encoder.input_blocks):
        h = block(h, emb, context)
        if encoder.style:
            hints.append(lin(h.mean(dim=(2, 3)), zero))
        else:
            hints.append(F.conv2d(h, zero.weight, zero.bias).flatten(2).transpose(1, 2))
    return hints[::-1]


def restated_size_embedding(image_hw, target_hw):
    hx, wx = image_hw
    H, W = target_hw
    if hx < H or wx < W:
        hp = hx + max(H, W)
        wp = wx / hx * hp
    else:
        hp, wp = hx, wx
    return torch.cat([sinusoid([hp / H], 256), sinusoid([wp / W], 256)], dim=1)


# ---------------------------------------------------------------------------------- restated attention
def lora_linear(x, base, lora, mode):
    y = lin(x, base)
    if mode is not None:
        side = lora.sides[mode]
        y = y + (x @ side.down.weight.T) @ side.up.weight.T
    return y


def restated_attn2(attn, lora, x, context, scale, split=None, mask=None, lora_layer=False, index=0, tie_lora=None):
    """attn2 of one block: the default path, or the masked forward of §3.3 (LoRA version for LoRA layers;
    ``tie_lora`` overrides which tie rule applies)."""
    heads = attn.heads

    def qkv(x, c, mode):
        return (lora_linear(x, attn.to_q, lora.projections["to_q"] if lora else None, mode),
                lora_linear(c, attn.to_k, lora.projections["to_k"] if lora else None, mode),
                lora_linear(c, attn.to_v, lora.projections["to_v"] if lora else None, mode))

    if split is None:
        return lin(attention(*qkv(x, context, None), heads) * scale, attn.to_out[0])
    m = F.interpolate(mask, scale_factor=FACTOR[index], mode="bicubic").flatten(2).transpose(1, 2)
    c_f, c_b = context.chunk(2, dim=1)
    mode_b = "bg" if lora_layer and split.bg_lora else None
    o_b = attention(*qkv(x, c_b, mode_b), heads) * scale * split.background_strength
    mode_f = "fg" if lora_layer and split.fg_lora else None
    o_f = attention(*qkv(x, c_f, mode_f), heads) * scale * split.foreground_strength
    o_f = o_f * (1 - split.merging_scale) + o_b * split.merging_scale
    tau = TAU_S
    lora_tie = lora_layer if tie_lora is None else tie_lora
    o = torch.where(m > tau, o_f, o_b) if lora_tie else torch.where(m < tau, o_b, o_f)
    return lin(o, attn.to_out[0])


# ---------------------------------------------------------------------------------- restated U-Net
def restated_unet(unet, modules, x, t, context, hints, scales, mask=None, split=None, hs_bg=None, style=None,
                  lora_names=()):
    """The original's ``enhanced_forward`` (§3.6) with the attn2 of ``restated_attn2`` in every block."""
    names = {id(m): n for n, m in unet.named_modules()}
    loras = modules.lora if modules is not None else {}
    counter = iter(range(16))

    def transformer(st, h):
        x_in = h
        b, c, hh, ww = h.shape
        y = st.proj_in(st.norm(h)).flatten(2).transpose(1, 2)
        for tb in st.transformer_blocks:
            i = next(counter)
            name = names[id(tb.attn2)]
            y = y + tb.attn1(tb.norm1(y))
            y = y + restated_attn2(tb.attn2, loras.get(name), layer_norm(y, tb.norm2), context, scales[i], split,
                                   mask, name in lora_names, i)
            y = y + tb.ff(tb.norm3(y))
        return st.proj_out(y.transpose(1, 2).reshape(b, -1, hh, ww)) + x_in

    def run(block, h, emb):
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = transformer(layer, h)
            else:
                h = layer(h)
        return h

    emb = unet.time_embed(sinusoid(t.reshape(-1).tolist(), unet.model_channels))
    hs, h, k = [], x, 0
    for idx, block in enumerate(unet.input_blocks):
        h = run(block, h, emb)
        if idx in HINT_AT:
            h = h + hints[k]
            k += 1
        hs.append(h)
    h = run(unet.middle_block, h, emb)
    for j, block in enumerate(unet.output_blocks):
        skip = hs.pop()
        if mask is not None:
            c = F.interpolate(mask, skip.shape[-2:], mode="bicubic")
            warped = restated_warp(modules.warp_modules[j], skip, hs_bg[j]) if hs_bg is not None else skip
            skip = torch.where(c > TAU_S, skip, warped)
        h = run(block, torch.cat([h, skip], dim=1), emb)
        if style is not None:
            h = restated_style(modules.style_modules[j], style[j], emb, h)
    return unet.out(h)


# ------------------------------------------------------------------------------------------- building blocks
def test_building_blocks_equal_their_restated_formulas(models):
    _, _, v15 = models["v1.5"]
    unet2, _, v2 = models["v2"]
    e = v15.thresh_embedder(torch.tensor([0.5, 0.05]))
    assert torch.allclose(e, restated_threshold_embedding(v15.thresh_embedder, [0.5, 0.05]), atol=1e-5)
    assert not torch.allclose(e[0], e[1]), "different thresholds, different embeddings"
    for image_hw in ((48, 40), (96, 128), (64, 64)):
        assert torch.allclose(size_embedding(image_hw, SIZE), restated_size_embedding(image_hw, SIZE), atol=1e-6)
    tokens = torch.randn(1, 9, CTX, generator=gen(1))
    ct = v15.cluster_transformer(tokens)
    assert ct.shape == (1, N_TOKENS, CTX)   # token_length, whatever the input length
    assert torch.allclose(ct, restated_cluster_transformer(v15.cluster_transformer, tokens), atol=1e-4)
    skip = torch.randn(2, 128, 1, 1, generator=gen(2))
    table = torch.randn(2, 1, 128, generator=gen(3))
    warp = v2.warp_modules[0]
    assert torch.allclose(warp(skip, table), restated_warp(warp, skip, table), atol=1e-4)
    emb = torch.randn(2, 128, generator=gen(4))
    h = torch.randn(2, 128, 2, 2, generator=gen(5))
    mod = torch.randn(2, 256, generator=gen(6))
    style = v2.style_modules[0]
    gamma, beta = style.scale_shift(mod, emb)
    assert torch.allclose(h * (1 + gamma) + beta, restated_style(style, mod, emb, h), atol=1e-4)
    z = torch.randn(1, 4, *LATENT, generator=gen(7))
    y = size_embedding((48, 40), SIZE)
    context = torch.randn(1, N_TOKENS, CTX, generator=gen(8))
    for encoder in (v2.bg_encoder, v2.style_encoder):
        ours, restated = encoder(z, y, context), restated_encoder(encoder, z, y, context)
        assert [tuple(o.shape) for o in ours] == [tuple(r.shape) for r in restated]
        assert all(torch.allclose(o, r, atol=1e-4) for o, r in zip(ours, restated))
    shapes = [tuple(h.shape[1:]) for h in v2.bg_encoder(z, y, context)]
    assert shapes == ([(1, 128)] * 3 + [(4, 128)] * 2 + [(4, 64)] + [(16, 64)] * 2 + [(16, 32)]
                      + [(64, 32)] * 3)   # = the skip that decoder block j consumes


@pytest.mark.parametrize("version", ["v1", "v1.5", "v2"])
def test_split_attention_of_every_block_equals_the_masked_forward(models, version):
    """§3.3 per block: both passes, β_f, β_b, μ, s_ℓ, the LoRA side per pass, the tie rule per layer type."""
    unet, _, modules = models[version]
    loras = modules.lora if modules is not None else {}
    names = {id(m): n for n, m in unet.named_modules()}
    scales = [0.5 + i / 40 for i in range(16)]
    split = SplitAttention(foreground_strength=0.8, background_strength=0.6, merging_scale=0.3,
                           fg_lora=True, bg_lora=True)
    mask = sketch_latent_mask()
    context = torch.randn(1, 2 * N_TOKENS, CTX, generator=gen(11))
    processors = [SplitCrossAttention(tuple(loras)), CrossAttentionScale(scales)]
    if loras:
        processors.append(SplitLoRAHooks(loras))
    wrong_tie = 0
    with ProcessorSet(unet, processors) as installed:
        for i, block in enumerate(transformer_blocks(unet)):
            attn = block.attn2
            n = int(LATENT[0] * FACTOR[i]) * int(LATENT[1] * FACTOR[i])
            x = torch.randn(1, n, attn.to_q.in_features, generator=gen(20 + i))
            with installed.call(UNetCall(mask=mask, mask_threshold=TAU_S, split=SplitAttention(
                    split.foreground_strength, split.background_strength, split.merging_scale, True, True))):
                ours = attn(x, context=context)
            lora_layer = names[id(attn)] in loras
            expected = restated_attn2(attn, loras.get(names[id(attn)]), x, context, scales[i], split, mask,
                                      lora_layer, i)
            assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max(), (version, i)
            if FACTOR[i] == 1.0:   # ties at the full-resolution layers: the other rule gives another output
                other = restated_attn2(attn, loras.get(names[id(attn)]), x, context, scales[i], split, mask,
                                       lora_layer, i, tie_lora=not lora_layer)
                wrong_tie += int(not torch.allclose(ours, other, atol=1e-5))
            plain = restated_attn2(attn, None, x, context[:, :N_TOKENS], scales[i])
            assert not torch.allclose(ours, plain, atol=1e-4), "the split must change attn2"
    assert wrong_tie == 5, "every full-resolution layer has tie tokens that the rule decides"
    assert {names[id(b.attn2)] in loras for b in transformer_blocks(unet)} == (
        {False} if version == "v1" else {True} if version == "v1.5" else {True, False})


# ----------------------------------------------------------------------------------- one guided call per mode
def encode_local(image):
    """A deterministic stand-in for CLIP_local (same on both sides): N_TOKENS tokens from pooled pixels."""
    pooled = F.adaptive_avg_pool2d(image.float(), (4, 4)).flatten(1)             # (1, 48)
    w = torch.randn(48, N_TOKENS * CTX, generator=gen(99)) / 7
    return (pooled @ w).reshape(1, N_TOKENS, CTX)


def vae_latent(vae, image, seed, offset):
    """§10.3 with the run's CPU noise: 0.18215 · (mean + std · N(seed + offset)) of bicubic(image, (H, W))."""
    posterior = vae.encode(F.interpolate(image, size=SIZE, mode="bicubic"))
    noise = torch.randn(posterior.mean.shape, generator=gen(seed + offset))
    return LATENT_SCALE * (posterior.mean + posterior.std * noise)


def restated_conditions(version, options, modules, vae, E, reference, rmask, background, seed):
    """prepare_conditions of §5 (v1), §6 (v1.5), §7 (v2): context, LoRA flags, hs_bg, style."""
    tau_r = options.reference_mask_threshold
    ref_bg = torch.where(rmask < tau_r, reference, torch.ones_like(reference)) if rmask is not None else None
    flags = (False, False)
    hs_bg = style = G_B = z_b = None
    if version == "v1":
        G = encode_local(background if background is not None else ref_bg)
        context = torch.cat([E, G], 1)
    elif version == "v1.5":
        e_r, e_s = restated_threshold_embedding(modules.thresh_embedder, [tau_r, TAU_S]).chunk(2) \
            if options.bg_enhance else (None, None)
        if options.bg_enhance:
            flags = (False, True)
            if background is not None:
                G = encode_local(background) + e_r
            else:
                G = restated_cluster_transformer(modules.cluster_transformer, encode_local(ref_bg) + e_r)
            context = torch.cat([E + e_s, G], 1)
        else:
            context = E
        if options.fg_enhance:
            flags = (True, False)
            context = context.repeat(1, 2, 1)
        if options.fg_enhance and options.bg_enhance:
            flags = (True, True)
    else:
        if options.style_enhance:
            z_r = vae_latent(vae, reference, seed, enhance.REFERENCE_LATENT_SEED)
            y_r = restated_size_embedding(reference.shape[-2:], SIZE)
            if background is not None:
                z_b = vae_latent(vae, background, seed, enhance.BACKGROUND_LATENT_SEED)
                G_B = encode_local(background)
                both = restated_encoder(modules.style_encoder, torch.cat([z_r, z_b]),
                                        torch.cat([y_r, restated_size_embedding(background.shape[-2:], SIZE)]),
                                        torch.cat([E, G_B]))
                mu = options.merging_scale
                style = [m[:1] * (1 - mu) + mu * m[1:] for m in both]
            else:
                style = restated_encoder(modules.style_encoder, z_r, y_r, E)
        bg_emb = None
        if options.bg_enhance:
            flags = (True, True)
            if z_b is not None:
                z, bg_emb, y, input_emb = z_b, G_B, restated_size_embedding(background.shape[-2:], SIZE), E
            elif background is not None:
                z = vae_latent(vae, background, seed, enhance.BACKGROUND_LATENT_SEED)
                bg_emb = encode_local(background)
                y, input_emb = restated_size_embedding(background.shape[-2:], SIZE), bg_emb
            else:
                z = vae_latent(vae, ref_bg, seed, enhance.MASKED_REFERENCE_LATENT_SEED)
                bg_emb = encode_local(ref_bg)
                y, input_emb = restated_size_embedding(reference.shape[-2:], SIZE), E
            hs_bg = [h * options.background_factor for h in restated_encoder(modules.bg_encoder, z, y, input_emb)]
        if options.bg_enhance or options.fg_enhance:
            context = torch.cat([E, bg_emb if bg_emb is not None else (G_B if G_B is not None else E)], 1)
        else:
            context = E
    return context, flags, hs_bg, style


MODES = [
    ("v1", dict(bg_enhance=True)),
    ("v1", dict(bg_enhance=True, background=True, foreground_strength=0.7, merging_scale=0.2)),
    ("v1.5", dict(bg_enhance=True)),
    ("v1.5", dict(bg_enhance=True, background=True, background_strength=0.6)),
    ("v1.5", dict(fg_enhance=True)),
    ("v1.5", dict(fg_enhance=True, bg_enhance=True, merging_scale=0.25)),
    ("v2", dict(style_enhance=True)),
    ("v2", dict(style_enhance=True, background=True, merging_scale=0.4)),
    ("v2", dict(bg_enhance=True, background_factor=1.5)),
    ("v2", dict(bg_enhance=True, background=True)),
    ("v2", dict(bg_enhance=True, style_enhance=True, background=True, foreground_strength=0.5)),   # Q5
    ("v2", dict(fg_enhance=True, foreground_strength=0.6)),   # [E ; E] without LoRA: only β changes it
    ("v2", dict(fg_enhance=True, style_enhance=True, background=True)),                          # Q17
]


@pytest.mark.parametrize("version,mode", MODES, ids=[f"{v}-{'+'.join(k for k in m if m[k] is True)}"
                                                     for v, m in MODES])
def test_one_guided_call_per_mode_equals_the_original(models, version, mode):
    unet, vae, modules = models[version]
    mode = dict(mode)
    with_background = mode.pop("background", False)
    reference = torch.rand(1, 3, 40, 48, generator=gen(30)) * 2 - 1
    background = torch.rand(1, 3, 48, 40, generator=gen(31)) * 2 - 1 if with_background else None
    rmask = (torch.rand(1, 1, 40, 48, generator=gen(32)) > 0.5).float()
    options = ColorizeOptions(enabled=True, reference_guidance=3.0, sketch_guidance=2.0,
                              sketch_mask_threshold=TAU_S, reference_mask_threshold=0.5, **mode)
    E = torch.randn(1, N_TOKENS, CTX, generator=gen(33))
    mask = sketch_latent_mask()
    inputs = enhance.MaskInputs(latent_mask=mask, reference=reference, background=background,
                                reference_mask=rmask if background is None else None)
    seed = 5
    with torch.no_grad():
        plan_enhance, context = enhance.prepare_enhance(
            version, options, modules, E, inputs, encode_local=encode_local, vae_encode=vae.encode, seeds=[seed],
            size=SIZE, cache=ContentCache())
        expected_context, flags, hs_bg, style = restated_conditions(
            version, options, modules, vae, E, reference, rmask if background is None else None, background, seed)
    assert context.shape == expected_context.shape
    assert torch.allclose(context, expected_context, atol=1e-4)
    if plan_enhance.split is not None:
        assert (plan_enhance.split.fg_lora, plan_enhance.split.bg_lora) == flags
    for ours, theirs in ((plan_enhance.hs_bg, hs_bg), (plan_enhance.style_modulations, style)):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert all(torch.allclose(o, r, atol=1e-4) for o, r in zip(ours[0], theirs))

    hints = [torch.randn(1, *s, generator=gen(40 + i)) for i, s in enumerate(
        [(32, 8, 8), (32, 4, 4), (64, 2, 2), (128, 1, 1), (128, 1, 1)])]
    blank = [h.flip(1) for h in hints]
    scales = [1.0 - i / 50 for i in range(16)]
    plan = build_plan(options, sketch_hints=hints, blank_hints=blank, tokens=context, enhance=plan_enhance)
    x = torch.randn(1, 4, *LATENT, generator=gen(50))
    t = torch.tensor([600.0])

    def inner(x_in, sigma_in, ctx):
        return unet(x_in, sigma_in, ctx)

    with torch.no_grad():
        with for_generation(unet, layer_scales=scales, enhance=plan_enhance) as processors:
            ours = guided_call(plan, processors, inner, x, t, t)
        # the original: rows [c | uc0 | uc1] (§8.1), one U-Net call on all of them, the dual-CFG combination
        rows = torch.cat([x] * 3)
        ctx_rows = torch.cat([expected_context, torch.zeros_like(expected_context), expected_context])
        hint_rows = [torch.cat([h, h, b]) for h, b in zip(hints, blank)]
        mask_guided = options.bg_enhance or options.fg_enhance
        split = plan_enhance.split
        lora_names = tuple(modules.lora) if modules is not None and version != "v1" else ()
        out = restated_unet(unet, modules, rows, t.expand(3), ctx_rows, hint_rows, scales,
                            mask=mask if mask_guided else None, split=split if mask_guided else None,
                            hs_bg=[h.expand(3, -1, -1) for h in hs_bg] if hs_bg is not None else None,
                            style=[s.expand(3, -1) for s in style] if style is not None else None,
                            lora_names=lora_names)
        c, u0, u1 = out.chunk(3)
        expected = 0.5 * (u0 + 3.0 * (c - u0) + u1 + 2.0 * (c - u1))
        default_plan = build_plan(options, sketch_hints=hints, blank_hints=blank, tokens=E)
        with for_generation(unet, layer_scales=scales) as processors:
            default = guided_call(default_plan, processors, inner, x, t, t)
    assert (ours - expected).abs().max() <= 2e-4 * expected.abs().max(), (ours - expected).abs().max()
    assert (ours - default).abs().max() > 1e-2 * default.abs().max(), "the mode must change the output"


def test_closed_window_equals_the_full_length_zero_context_and_keeps_mask_warp_and_style(models):
    """§8.3 recommendation: outside the window the 2n-token context is zeroed (we pass one zero token, which
    gives the same), while the mask, hs_bg and style stay active."""
    unet, vae, modules = models["v2"]
    options = ColorizeOptions(enabled=True, reference_guidance=3.0, sketch_guidance=1.0, bg_enhance=True,
                              style_enhance=True, sketch_mask_threshold=TAU_S, guidance_start=0.9)
    reference = torch.rand(1, 3, 40, 48, generator=gen(60)) * 2 - 1
    inputs = enhance.MaskInputs(latent_mask=sketch_latent_mask(), reference=reference,
                                reference_mask=(torch.rand(1, 1, 40, 48, generator=gen(61)) > 0.5).float())
    E = torch.randn(1, N_TOKENS, CTX, generator=gen(62))
    with torch.no_grad():
        plan_enhance, context = enhance.prepare_enhance("v2", options, modules, E, inputs, encode_local=encode_local,
                                                        vae_encode=vae.encode, seeds=[1], size=SIZE,
                                                        cache=ContentCache())
    hints = [torch.randn(1, *s, generator=gen(70 + i)) for i, s in enumerate(
        [(32, 8, 8), (32, 4, 4), (64, 2, 2), (128, 1, 1), (128, 1, 1)])]
    plan = build_plan(options, sketch_hints=hints, blank_hints=hints, tokens=context, enhance=plan_enhance)
    x = torch.randn(1, 4, *LATENT, generator=gen(63))
    t = torch.tensor([700.0])      # τ ≈ 0.3 < 0.9: closed
    inner = lambda x_in, s, ctx: unet(x_in, s, ctx)   # noqa: E731
    with torch.no_grad():
        with for_generation(unet, enhance=plan_enhance) as processors:
            ours = guided_call(plan, processors, inner, x, t, t)
        zeros = torch.zeros_like(context)
        expected = restated_unet(unet, modules, torch.cat([x] * 2), t.expand(2), torch.cat([zeros, zeros]),
                                 [torch.cat([h, h]) for h in hints], [1.0] * 16, mask=sketch_latent_mask(),
                                 split=plan_enhance.split, hs_bg=[h.expand(2, -1, -1) for h in plan_enhance.hs_bg[0]],
                                 style=[s.expand(2, -1) for s in plan_enhance.style_modulations[0]],
                                 lora_names=tuple(modules.lora))
        c, u0 = expected.chunk(2)
        expected = u0 + 3.0 * (c - u0)
        plain = unet(x, t, torch.zeros(1, 1, CTX))
    assert (ours - expected).abs().max() <= 2e-4 * expected.abs().max()
    assert not torch.allclose(ours, plain, atol=1e-3), "warp and style act outside the window too"
