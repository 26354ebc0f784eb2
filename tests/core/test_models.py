"""U-Net, VAE and sketch encoder: key layout, shapes (method §3, §4.1) and parity with the maths restated here
independently as plain functional code over the state dict (method §10.4 tolerances)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_colorize.models import LATENT_SCALE, AutoencoderKL, SketchEncoder, UNetConfig, UNetModel
from lib_colorize.models.sketch_encoder import SketchEncoderConfig
from lib_colorize.models.unet import timestep_embedding
from lib_colorize.models.vae import VAEConfig
from lib_colorize.testing.checkpoints import (
    SKETCH_PREFIX, UNET_PREFIX, VAE_PREFIX, make_checkpoint, random_tensor, released_layout, transformer_prefixes,
    tiny_dims,
)
from lib_colorize.checkpoint import read_tensors

torch.backends.cuda.matmul.allow_tf32 = False

# method §4.1: UNet location of the 16 transformer blocks, DFS order, and width as a multiple of model_channels.
BLOCK_PREFIXES = ["input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "input_blocks.5.1",
                  "input_blocks.7.1", "input_blocks.8.1", "middle_block.1", "output_blocks.3.1", "output_blocks.4.1",
                  "output_blocks.5.1", "output_blocks.6.1", "output_blocks.7.1", "output_blocks.8.1",
                  "output_blocks.9.1", "output_blocks.10.1", "output_blocks.11.1"]
BLOCK_MULTS = [1, 1, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2, 1, 1, 1]


@pytest.fixture(scope="module")
def v1_file(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mult-ft.safetensors", version="v1", seed=3)


def _float(sd):
    return {k: v.float() for k, v in sd.items()}


@pytest.fixture(scope="module")
def unet_sd(v1_file):
    return _float(read_tensors(v1_file, UNET_PREFIX))


@pytest.fixture(scope="module")
def tiny_unet(unet_sd):
    return UNetModel.from_state_dict(unet_sd).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Layout and shapes


def _block_table(unet):
    names = {id(m): n for n, m in unet.named_modules()}
    return [(names[id(b)], b.attn1.to_q.in_features, b.attn2.heads) for b in unet.transformer_blocks()]


def test_sixteen_transformer_blocks_in_dfs_order_full_size():
    with torch.device("meta"):
        unet = UNetModel(UNetConfig())
    table = _block_table(unet)
    assert [n for n, _, _ in table] == [p + ".transformer_blocks.0" for p in BLOCK_PREFIXES]
    assert [c for _, c, _ in table] == [320 * m for m in BLOCK_MULTS]
    assert [h for _, _, h in table] == [5 * m for m in BLOCK_MULTS]  # heads of 64 channels (method §4.1)
    assert transformer_prefixes(tiny_dims()) == BLOCK_PREFIXES
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # method §1.3: 865.9 M


def test_tiny_transformer_blocks_widths_and_heads(tiny_unet):
    table = _block_table(tiny_unet)
    assert [n for n, _, _ in table] == [p + ".transformer_blocks.0" for p in BLOCK_PREFIXES]
    assert [c for _, c, _ in table] == [32 * m for m in BLOCK_MULTS]
    assert [h for _, _, h in table] == [max(1, 32 * m // 64) for m in BLOCK_MULTS]
    assert all(b.attn2.to_k.in_features == 64 for b in tiny_unet.transformer_blocks())


def test_config_inferred_from_weights(unet_sd):
    cfg = UNetConfig.from_state_dict(unet_sd)
    assert (cfg.model_channels, tuple(cfg.channel_mult), cfg.num_res_blocks) == (32, (1, 2, 4, 4), 2)
    assert (tuple(cfg.attention_levels), cfg.context_dim, cfg.use_linear_proj) == ((0, 1, 2), 64, False)
    assert (cfg.in_channels, cfg.out_channels, cfg.transformer_depth) == (4, 4, 1)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_model_keys_equal_released_layout(size):
    layout = released_layout("v2", size)  # v2 has every extra prefix; they must stay outside the models
    dims = tiny_dims() if size == "tiny" else None
    with torch.device("meta"):
        models = {
            UNET_PREFIX: UNetModel(UNetConfig() if dims is None else UNetConfig(model_channels=32, context_dim=64)),
            VAE_PREFIX: AutoencoderKL(VAEConfig() if dims is None else VAEConfig(ch=32)),
            SKETCH_PREFIX: SketchEncoder(SketchEncoderConfig() if dims is None else SketchEncoderConfig(
                stem_channels=dims.sketch_stem, hint_channels=dims.sketch_hints)),
        }
    for prefix, model in models.items():
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        released = {k[len(prefix):]: s for k, (s, _) in layout.items() if k.startswith(prefix)
                    and ".lora_" not in k and not k.startswith((UNET_PREFIX + "warp_", UNET_PREFIX + "style_"))}
        assert set(ours) == set(released), (prefix, set(ours) ^ set(released))
        assert ours == released


def test_strict_load_from_generated_file(v1_file):
    for prefix, cls in ((UNET_PREFIX, UNetModel), (VAE_PREFIX, AutoencoderKL), (SKETCH_PREFIX, SketchEncoder)):
        sd = _float(read_tensors(v1_file, prefix))
        model = cls.from_state_dict(sd)  # strict=True
        missing, unexpected = model.load_state_dict(sd, strict=True)
        assert not missing and not unexpected
        for key, value in model.state_dict().items():
            assert torch.equal(value, sd[key])


def test_unet_forward_shape_tiny(tiny_unet):
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        y = tiny_unet(x, torch.tensor([999.0, 12.5]), torch.randn(2, 5, 64))
    assert y.shape == (2, 4, 32, 32)
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_linear_and_conv_proj_give_the_same_network(unet_sd, tiny_unet):
    linear_sd = {k: (v[:, :, 0, 0] if k.endswith(("proj_in.weight", "proj_out.weight")) else v)
                 for k, v in unet_sd.items()}
    linear_unet = UNetModel.from_state_dict(linear_sd).eval()
    assert linear_unet.config.use_linear_proj and not tiny_unet.config.use_linear_proj
    assert isinstance(linear_unet.input_blocks[1][1].proj_in, torch.nn.Linear)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([400.0]), torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear_unet(x, t, c), tiny_unet(x, t, c), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_cos_then_sin_fractional():
    t = torch.tensor([0.0, 2.5, 999.0])
    emb = timestep_embedding(t, 8)
    for row, tv in enumerate(t.tolist()):
        for k in range(4):
            freq = 10000 ** (-k / 4)
            assert emb[row, k].item() == pytest.approx(math.cos(tv * freq), abs=1e-4)
            assert emb[row, 4 + k].item() == pytest.approx(math.sin(tv * freq), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Contracts relied on by the U-Net processors (lib_colorize/processors)


def test_attn2_gets_context_keyword_and_to_out_is_hookable(tiny_unet):
    seen_kwargs, to_out_inputs = [], []
    handles = []
    for block in tiny_unet.transformer_blocks():
        handles.append(block.attn2.register_forward_pre_hook(
            lambda m, args, kwargs: seen_kwargs.append((len(args), sorted(kwargs))), with_kwargs=True))
        handles.append(block.attn2.to_out[0].register_forward_pre_hook(
            lambda m, args: to_out_inputs.append(args[0].shape)))
    try:
        with torch.no_grad():
            tiny_unet(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), torch.randn(1, 3, 64))
    finally:
        for h in handles:
            h.remove()
    assert seen_kwargs == [(1, ["context"])] * 16
    assert len(to_out_inputs) == 16


def test_zero_attention_scale_leaves_to_out_bias(tiny_unet):
    """A pre-hook on attn2.to_out[0] scaling its input by 0 leaves exactly the bias (method §4.2)."""
    block = tiny_unet.transformer_blocks()[6]
    handle = block.attn2.to_out[0].register_forward_pre_hook(lambda m, args: (args[0] * 0.0,))
    try:
        with torch.no_grad():
            out = block.attn2(torch.randn(1, 4, 128), context=torch.randn(1, 3, 64))
    finally:
        handle.remove()
    torch.testing.assert_close(out, block.attn2.to_out[0].bias.expand(1, 4, 128))


def test_input_block_forward_hook_changes_the_skip(tiny_unet):
    """Hint injection contract (method §3): a forward hook on input_blocks[11] also changes the stored skip."""
    delta = 0.5
    captured = {}
    h1 = tiny_unet.input_blocks[11].register_forward_hook(lambda m, a, out: captured.update(raw=out))
    h2 = tiny_unet.input_blocks[11].register_forward_hook(lambda m, a, out: out + delta)
    h3 = tiny_unet.output_blocks[0].register_forward_pre_hook(lambda m, a: captured.update(inp=a[0]))
    try:
        with torch.no_grad():
            tiny_unet(torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 3, 64))
    finally:
        for h in (h1, h2, h3):
            h.remove()
    c = captured["raw"].shape[1]
    # the skip concatenated into output_blocks[0] is the hooked output (delta included), not the raw one
    torch.testing.assert_close(captured["inp"][:, -c:], captured["raw"] + delta)


# ---------------------------------------------------------------------------------------------------------------------
# Independent functional restatement of the U-Net (method §1.1, §4.2, §4.4)


def _gn(x, sd, p, eps):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps)


def _ref_resblock(x, emb, sd, p):
    h = F.conv2d(F.silu(_gn(x, sd, p + ".in_layers.0", 1e-5)), sd[p + ".in_layers.2.weight"],
                 sd[p + ".in_layers.2.bias"], padding=1)
    h = h + F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(_gn(h, sd, p + ".out_layers.0", 1e-5)), sd[p + ".out_layers.3.weight"],
                 sd[p + ".out_layers.3.bias"], padding=1)
    if p + ".skip_connection.weight" in sd:
        x = F.conv2d(x, sd[p + ".skip_connection.weight"], sd[p + ".skip_connection.bias"])
    return x + h


def _ref_attention(x, ctx, sd, p, heads):
    """softmax(q kᵀ/√d) v per head, written out with matmuls (no SDPA)."""
    q, k, v = x @ sd[p + ".to_q.weight"].T, ctx @ sd[p + ".to_k.weight"].T, ctx @ sd[p + ".to_v.weight"].T
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, inner)
    return out @ sd[p + ".to_out.0.weight"].T + sd[p + ".to_out.0.bias"]


def _ref_transformer_block(x, ctx, sd, p, heads):
    c = x.shape[-1]

    def ln(t, name):
        return F.layer_norm(t, (c,), sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], 1e-5)

    x = x + _ref_attention(ln(x, "norm1"), ln(x, "norm1"), sd, p + ".attn1", heads)
    x = x + _ref_attention(ln(x, "norm2"), ctx, sd, p + ".attn2", heads)
    hidden, gate = (ln(x, "norm3") @ sd[p + ".ff.net.0.proj.weight"].T + sd[p + ".ff.net.0.proj.bias"]).chunk(2, -1)
    gelu_gate = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    return x + (hidden * gelu_gate) @ sd[p + ".ff.net.2.weight"].T + sd[p + ".ff.net.2.bias"]


def _ref_spatial_transformer(x, ctx, sd, p):
    b, c, hh, ww = x.shape
    heads = max(1, c // 64)
    h = _gn(x, sd, p + ".norm", 1e-6)
    tokens = h.flatten(2).transpose(1, 2)  # (B, hw, C); 1x1 conv == per-token linear
    w_in = sd[p + ".proj_in.weight"].reshape(c, c)
    tokens = tokens @ w_in.T + sd[p + ".proj_in.bias"]
    tokens = _ref_transformer_block(tokens, ctx, sd, p + ".transformer_blocks.0", heads)
    tokens = tokens @ sd[p + ".proj_out.weight"].reshape(c, c).T + sd[p + ".proj_out.bias"]
    return x + tokens.transpose(1, 2).reshape(b, c, hh, ww)


def _ref_timestep_embedding(t, dim):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    args = t.double()[:, None] * torch.pow(10000.0, -k / half)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _ref_block(h, emb, ctx, sd, p):
    for j in range(3):
        sub = f"{p}.{j}"
        if sub + ".op.weight" in sd:
            h = F.conv2d(h, sd[sub + ".op.weight"], sd[sub + ".op.bias"], stride=2, padding=1)
        elif sub + ".in_layers.0.weight" in sd:
            h = _ref_resblock(h, emb, sd, sub)
        elif sub + ".norm.weight" in sd:
            h = _ref_spatial_transformer(h, ctx, sd, sub)
        elif sub + ".conv.weight" in sd:
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[sub + ".conv.weight"],
                         sd[sub + ".conv.bias"], padding=1)
        elif sub + ".weight" in sd:
            h = F.conv2d(h, sd[sub + ".weight"], sd[sub + ".bias"], padding=1)
    return h


def _ref_unet(sd, x, t, ctx):
    mc = sd["input_blocks.0.0.weight"].shape[0]
    emb = F.linear(_ref_timestep_embedding(t, mc), sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    n_out = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))
    skips, h = [], x
    for i in range(n_in):
        h = _ref_block(h, emb, ctx, sd, f"input_blocks.{i}")
        skips.append(h)
    h = _ref_block(h, emb, ctx, sd, "middle_block")
    for i in range(n_out):
        h = _ref_block(torch.cat([h, skips.pop()], 1), emb, ctx, sd, f"output_blocks.{i}")
    h = F.silu(_gn(h, sd, "out.0", 1e-5))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def test_transformer_block_matches_restated_maths(tiny_unet, unet_sd):
    p = "middle_block.1.transformer_blocks.0"  # 128 channels, 2 heads
    x, ctx = torch.randn(2, 10, 128), torch.randn(2, 7, 64)
    with torch.no_grad():
        ours = tiny_unet.middle_block[1].transformer_blocks[0](x, context=ctx)
    ref = _ref_transformer_block(x.double(), ctx.double(), {k: v.double() for k, v in unet_sd.items()}, p, 2)
    assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_unet_matches_restated_maths(tiny_unet, unet_sd):
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 24), torch.tensor([999.0, 37.25]), torch.randn(2, 5, 64)
    with torch.no_grad():
        ours = tiny_unet(x, t, ctx)
    ref = _ref_unet({k: v.double() for k, v in unet_sd.items()}, x.double(), t, ctx.double())
    assert ours.shape == ref.shape == (2, 4, 16, 24)
    err = (ours.double() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, err  # method §10.4


# ---------------------------------------------------------------------------------------------------------------------
# Sketch encoder (method §3)


def _ref_sketch_encoder(sd, x):
    """Explicit F.conv2d chain of method §3."""
    for n, index in enumerate(range(0, 16, 2)):
        if n:
            x = F.silu(x)
        x = F.conv2d(x, sd[f"model.{index}.weight"], sd[f"model.{index}.bias"],
                     stride=2 if index in (4, 8, 12) else 1, padding=1)
    hints = [F.conv2d(x, sd["zero_layer.0.weight"], sd["zero_layer.0.bias"])]
    for i in range(4):
        x = F.conv2d(F.silu(x), sd[f"output_blocks.{i}.1.weight"], sd[f"output_blocks.{i}.1.bias"],
                     stride=2 if i < 3 else 1, padding=1)
        x = F.conv2d(F.silu(x), sd[f"output_blocks.{i}.3.weight"], sd[f"output_blocks.{i}.3.bias"], padding=1)
        hints.append(F.conv2d(x, sd[f"zero_blocks.{i}.0.weight"], sd[f"zero_blocks.{i}.0.bias"]))
    return hints


@pytest.fixture(scope="module")
def sketch_sd(v1_file):
    return _float(read_tensors(v1_file, SKETCH_PREFIX))


@pytest.mark.parametrize("hw", [(128, 128), (128, 192)])
def test_sketch_encoder_hint_shapes_and_parity(sketch_sd, hw):
    enc = SketchEncoder.from_state_dict(sketch_sd).eval()
    height, width = hw
    h, w = height // 8, width // 8
    sketch = torch.rand(2, 3, height, width) * 2 - 1
    with torch.no_grad():
        hints = enc(sketch)
    assert [tuple(t.shape) for t in hints] == [(2, 32, h, w), (2, 32, h // 2, w // 2), (2, 64, h // 4, w // 4),
                                             (2, 128, h // 8, w // 8), (2, 128, h // 8, w // 8)]
    ref = _ref_sketch_encoder({k: v.double() for k, v in sketch_sd.items()}, sketch.double())
    for ours, theirs in zip(hints, ref):
        assert (ours.double() - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("hw", [(512, 512), (512, 768)])
def test_sketch_encoder_full_widths_shapes(hw):
    with torch.device("meta"):
        enc = SketchEncoder()
        hints = enc(torch.empty(1, 3, *hw))
    h, w = hw[0] // 8, hw[1] // 8
    assert [tuple(t.shape) for t in hints] == [(1, 320, h, w), (1, 320, h // 2, w // 2), (1, 640, h // 4, w // 4),
                                             (1, 1280, h // 8, w // 8), (1, 1280, h // 8, w // 8)]
    assert sum(p.numel() for p in enc.parameters()) == 63_970_960  # method §1.3: 64.0 M


def test_sketch_encoder_blank_page_hints_are_not_zero(sketch_sd):
    enc = SketchEncoder.from_state_dict(sketch_sd).eval()
    with torch.no_grad():
        hints = enc(-torch.ones(1, 3, 64, 64))
    assert all(t.abs().max() > 1e-3 for t in hints)  # method §3: unconditional-sketch hints are not zero


# ---------------------------------------------------------------------------------------------------------------------
# VAE (method §1.1)


def _ref_vae_res(x, sd, p):
    h = F.conv2d(F.silu(_gn(x, sd, p + ".norm1", 1e-6)), sd[p + ".conv1.weight"], sd[p + ".conv1.bias"], padding=1)
    h = F.conv2d(F.silu(_gn(h, sd, p + ".norm2", 1e-6)), sd[p + ".conv2.weight"], sd[p + ".conv2.bias"], padding=1)
    if p + ".nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[p + ".nin_shortcut.weight"], sd[p + ".nin_shortcut.bias"])
    return x + h


def _ref_vae_attn(x, sd, p):
    b, c, hh, ww = x.shape
    h = _gn(x, sd, p + ".norm", 1e-6)
    q, k, v = (F.conv2d(h, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]).reshape(b, c, hh * ww) for n in "qkv")
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (B, HW_q, HW_k)
    out = (v @ weights.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + F.conv2d(out, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])


def _ref_vae_mid(h, sd, p):
    return _ref_vae_res(_ref_vae_attn(_ref_vae_res(h, sd, p + ".block_1"), sd, p + ".attn_1"), sd, p + ".block_2")


def _ref_vae_encode_mean(sd, x):
    h = F.conv2d(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    for level in range(4):
        for j in range(2):
            h = _ref_vae_res(h, sd, f"encoder.down.{level}.block.{j}")
        if level < 3:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[f"encoder.down.{level}.downsample.conv.weight"],
                         sd[f"encoder.down.{level}.downsample.conv.bias"], stride=2)
    h = _ref_vae_mid(h, sd, "encoder.mid")
    h = F.conv2d(F.silu(_gn(h, sd, "encoder.norm_out", 1e-6)), sd["encoder.conv_out.weight"],
                 sd["encoder.conv_out.bias"], padding=1)
    moments = F.conv2d(h, sd["quant_conv.weight"], sd["quant_conv.bias"])
    return moments[:, :4]


def _ref_vae_decode(sd, z):
    h = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = F.conv2d(h, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _ref_vae_mid(h, sd, "decoder.mid")
    for level in (3, 2, 1, 0):
        for j in range(3):
            h = _ref_vae_res(h, sd, f"decoder.up.{level}.block.{j}")
        if level:
            up = f"decoder.up.{level}.upsample.conv"
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[up + ".weight"], sd[up + ".bias"],
                         padding=1)
    h = F.silu(_gn(h, sd, "decoder.norm_out", 1e-6))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def test_vae_matches_restated_maths_and_samples(v1_file):
    sd = _float(read_tensors(v1_file, VAE_PREFIX))
    vae = AutoencoderKL.from_state_dict(sd).eval()
    assert vae.config.ch == 32 and tuple(vae.config.ch_mult) == (1, 2, 4, 4) and vae.config.embed_dim == 4
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    dsd = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        posterior = vae.encode(x)
        assert posterior.mean.shape == posterior.std.shape == (1, 4, 8, 6)
        ref_mean = _ref_vae_encode_mean(dsd, x.double())
        assert (posterior.mean.double() - ref_mean).abs().max() <= 1e-5 * ref_mean.abs().max()
        z = posterior.mean / 2
        image = vae.decode(z)
        ref_image = _ref_vae_decode(dsd, z.double())
        assert image.shape == (1, 3, 64, 48)
        assert (image.double() - ref_image).abs().max() <= 1e-5 * ref_image.abs().max()
        s1 = posterior.sample(generator=torch.Generator().manual_seed(7))
        s2 = posterior.sample(generator=torch.Generator().manual_seed(7))
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(s1, posterior.mean + posterior.std * noise)
    assert LATENT_SCALE == 0.18215


def test_random_weights_are_nonzero_everywhere():
    layout = released_layout("v1.5", "tiny")
    for key in list(layout)[::37]:
        shape, kind = layout[key]
        if kind.startswith("buffer"):
            continue
        t = random_tensor(key, shape, kind)
        assert (t != 0).float().mean() > 0.99, key


def test_norm_epsilons(tiny_unet):
    """method §4.4: GroupNorm eps 1e-5 in ResBlocks and ``out``, 1e-6 in SpatialTransformer.norm; LayerNorm 1e-5.
    (Random weights give activations of unit scale, where the eps difference is below the parity tolerance.)"""
    st = tiny_unet.input_blocks[1][1]
    assert (st.norm.eps, st.norm.num_groups) == (1e-6, 32)
    res = tiny_unet.input_blocks[1][0]
    assert (res.in_layers[0].eps, res.out_layers[0].eps) == (1e-5, 1e-5)
    assert tiny_unet.out[0].eps == 1e-5 and st.transformer_blocks[0].norm1.eps == 1e-5
