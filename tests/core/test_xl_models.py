"""XL checkpoints and networks: the released key layout with full-size shapes (method-xl §1.4-1.5), the variant and
parameterization rules (§1.3), and parity of the sketch encoder (§4), the projector (§3.4) and ``y`` (§2.2) with the
original's maths restated here from method-xl.md as plain functional code, written independently of ours."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lib_colorize.checkpoint import (inspect_checkpoint, load_checkpoint, parameterization_for, read_tensors,
                                     version_from_keys)
from lib_colorize.conditioning import xl_vector
from lib_colorize.errors import CheckpointError
from lib_colorize.models.projector import ClusterConcat, ProjectorConfig
from lib_colorize.models.sketch_encoder_xl import SketchEncoderXL, SketchEncoderXLConfig
from lib_colorize.models.unet import SDXL_UNET, UNetConfig, UNetModel, timestep_embedding
from lib_colorize.testing.xl_checkpoints import (TINY_XL, UNET_PREFIX, layout_parameters, make_xl_checkpoint,
                                                 xl_layout)

torch.set_num_threads(1)

# method-xl §2.4: where the 70 transformer blocks are (DFS order)
XL_BLOCKS = ([("input_blocks.4.1", 2), ("input_blocks.5.1", 2), ("input_blocks.7.1", 10), ("input_blocks.8.1", 10),
              ("middle_block.1", 10)] + [(f"output_blocks.{i}.1", 10) for i in (0, 1, 2)]
             + [(f"output_blocks.{i}.1", 2) for i in (3, 4, 5)])


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    return {"sdxl": make_xl_checkpoint(folder / "sdxl-tiny.safetensors", "sdxl", seed=1),
            "xlv2": make_xl_checkpoint(folder / "xlv2-tiny.safetensors", "xlv2", seed=2)}


# ------------------------------------------------------------------------------------------ layout and counts
def test_released_layout_has_the_derived_full_size_parameter_counts():
    sdxl, xlv2 = xl_layout("sdxl", "full"), xl_layout("xlv2", "full")
    assert layout_parameters(sdxl) == 2_689_631_675           # method-xl §1.4
    assert layout_parameters(xlv2) == 4_704_683_515
    expected = {UNET_PREFIX: (2_564_514_564, 1680), "first_stage_model.": (83_653_863, 248),
                "control_encoder.": (25_984_720, 47), "proj.": (15_478_528, 13)}
    for prefix, (params, keys) in expected.items():
        assert (layout_parameters(sdxl, prefix), sum(k.startswith(prefix) for k in sdxl)) == (params, keys), prefix
    assert layout_parameters(xlv2, "bg_encoder.") == 2_012_561_920
    assert sum(k.startswith("bg_encoder.") for k in xlv2) == 1162
    assert sum(".lora_" in k for k in xlv2) == 420 and layout_parameters(xlv2, UNET_PREFIX) - 2_564_514_564 == \
        2_478_080 + 11_840
    assert sdxl[UNET_PREFIX + "label_emb.0.0.weight"][0] == (1280, 512)
    assert xlv2["bg_encoder.label_emb.0.0.weight"][0] == (1280, 1024)
    assert xlv2["bg_encoder.input_blocks.0.0.weight"][0] == (320, 6, 3, 3)
    assert not any(k.startswith("bg_encoder.") and (".attn2." in k or ".norm2." in k or ".out." in k) for k in xlv2)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_our_models_have_exactly_the_released_keys_and_shapes(size):
    lay = xl_layout("xlv2", size)
    d = TINY_XL if size == "tiny" else None

    def released(prefix, skip=()):
        return {k[len(prefix):]: s for k, (s, _) in lay.items() if k.startswith(prefix)
                and not any(p in k for p in skip)}

    unet_cfg = SDXL_UNET if d is None else UNetConfig(**{**SDXL_UNET.__dict__, "model_channels": 32,
                                                        "context_dim": d.context_dim})
    import dataclasses
    refnet_cfg = dataclasses.replace(unet_cfg, in_channels=6, out_channels=6, adm_in_channels=1024, context_dim=None,
                                     cross_attention=False, num_output_blocks=7, final_layer=False)
    sketch_cfg = SketchEncoderXLConfig() if d is None else SketchEncoderXLConfig(
        stem_channels=tuple(d.sketch_stem) + (32,), level_channels=(32, 64, 128))
    proj_cfg = ProjectorConfig() if d is None else ProjectorConfig(clip_dim=d.clip_dim, wd_dim=d.wd_dim,
                                                                   output_dim=d.context_dim)
    with torch.device("meta"):
        models = {UNET_PREFIX: UNetModel(unet_cfg), "bg_encoder.": UNetModel(refnet_cfg),
                  "control_encoder.": SketchEncoderXL(sketch_cfg), "proj.": ClusterConcat(proj_cfg)}
    for prefix, model in models.items():
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = released(prefix, skip=(".lora_", "conv_fg") if prefix == UNET_PREFIX else ())
        assert ours == theirs, (prefix, sorted(set(ours) ^ set(theirs))[:5])
    unet = models[UNET_PREFIX]
    names = {id(m): n for n, m in unet.named_modules()}
    blocks = [names[id(b)] for b in unet.transformer_blocks()]
    assert blocks == [f"{p}.transformer_blocks.{k}" for p, depth in XL_BLOCKS for k in range(depth)]
    assert len(blocks) == 70
    if d is None:
        assert [b.attn1.heads for b in unet.transformer_blocks()][:2] == [10, 10]      # 640 / 64
        assert unet.transformer_blocks()[4].attn1.heads == 20                           # 1280 / 64


def test_config_inferred_from_the_files(xl_files):
    ck = load_checkpoint(xl_files["xlv2"], components=("unet", "vae", "sketch_encoder", "projector",
                                                         "reference_net"))
    assert ck.unet.config.transformer_depth == (1, 2, 10) and ck.unet.config.middle_transformer_depth == 10
    assert ck.unet.config.adm_in_channels == 512 and ck.unet.config.use_linear_proj
    assert ck.reference_net.config.num_output_blocks == 7 and not ck.reference_net.config.final_layer
    assert not ck.reference_net.config.cross_attention and ck.reference_net.config.in_channels == 6
    assert isinstance(ck.sketch_encoder, SketchEncoderXL) and isinstance(ck.projector, ClusterConcat)
    for name, prefix in (("unet", UNET_PREFIX), ("sketch_encoder", "control_encoder."), ("projector", "proj."),
                         ("reference_net", "bg_encoder.")):
        stored = read_tensors(xl_files["xlv2"], prefix)
        for key, value in getattr(ck, name).state_dict().items():
            assert torch.equal(value, stored[key]), (name, key)


# --------------------------------------------------------------------------------------- variant and parameterization
@pytest.mark.parametrize("name,version,parameterization", [
    ("sdxl.safetensors", "sdxl", "v"), ("sdxl-eps-v1.safetensors", "sdxl", "eps"),
    ("xlv2.safetensors", "xlv2", "v"), ("XLV2-EPS.safetensors", "xlv2", "eps")])
def test_variant_from_the_name_and_eps_anywhere_in_it(tmp_path, xl_files, name, version, parameterization):
    path = tmp_path / name
    os.link(xl_files[version], path)
    info = inspect_checkpoint(path)
    assert (info.version, info.parameterization, info.warnings) == (version, parameterization, ())
    assert info.family.is_xl and info.family.hint_blocks == (0, 3, 6, 8)


def test_name_and_keys_that_disagree(tmp_path, xl_files):
    wrong = tmp_path / "xlv2-base.safetensors"
    os.link(xl_files["sdxl"], wrong)
    with pytest.raises(CheckpointError, match="no ReferenceNet"):
        inspect_checkpoint(wrong)
    base_of_v2 = tmp_path / "sdxl-from-v2.safetensors"
    os.link(xl_files["xlv2"], base_of_v2)
    info = inspect_checkpoint(base_of_v2)
    assert info.version == "sdxl" and "does not use" in info.warnings[0]
    other = tmp_path / "colorizer.safetensors"
    os.link(xl_files["xlv2"], other)
    info = inspect_checkpoint(other)
    assert info.version == "xlv2" and "does not start with sdxl or xlv2" in info.warnings[0]
    assert parameterization_for("v2-full.safetensors", "v2") == "v"
    assert parameterization_for("mult-ft.safetensors", "v1") == "eps"           # the SD2.1 rule is unchanged
    assert version_from_keys(["model.diffusion_model.x", "control_encoder.model.0.weight", "bg_encoder.x"]) == "v2"


# --------------------------------------------------------------------------------------- the y vector (§2.2)
def restated_y(height, width):
    """[E_256(√(HW)) | E_256(7)], E the [cos | sin] sinusoid with period 10000, in float32 like ldm's."""
    def sinusoid(s):
        k = torch.arange(128, dtype=torch.float32)
        f = torch.exp(-math.log(10000.0) * k / 128)
        arg = torch.tensor(s, dtype=torch.float32) * f
        return torch.cat([torch.cos(arg), torch.sin(arg)])
    return torch.cat([sinusoid(math.sqrt(height * width)), sinusoid(7.0)])[None]


@pytest.mark.parametrize("size", [(1024, 1024), (768, 1344), (256, 256)])
def test_y_is_the_size_and_score_embedding(size):
    y = xl_vector(*size)
    assert y.shape == (1, 512) and y.dtype == torch.float32
    torch.testing.assert_close(y, restated_y(*size), atol=1e-6, rtol=0)
    # it can fail: the width alone, or the score 6, give another vector
    assert not torch.allclose(y, restated_y(size[1], size[1]), atol=1e-3) or size[0] == size[1]
    assert not torch.allclose(xl_vector(*size, aesthetic_score=6.0), y, atol=1e-3)


def test_y_reaches_the_time_embedding(xl_files):
    unet = load_checkpoint(xl_files["sdxl"], components=("unet",)).unet
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 196, TINY_XL.context_dim)
    with torch.no_grad():
        a, b = unet(x, t, ctx, xl_vector(1024, 1024)), unet(x, t, ctx, xl_vector(768, 768))
        assert not torch.allclose(a, b, atol=1e-4)
        with pytest.raises(ValueError, match="needs y"):
            unet(x, t, ctx)


# --------------------------------------------------------------------------------------- sketch encoder (§4)
def restated_sketch_encoder(sd, sketch, rope="rotation"):
    """method-xl §4, from the state dict: stem, three down steps, tokens [g, p₃, p₂, p₁, p₀], one block-causal
    attention with RMS-normed q/k and 2-D RoPE per scale (complex tables of positions up to 1023), residual,
    proj_outs. Heads of 128."""
    conv = lambda x, name, stride=1, pad=1: F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride, pad)
    x = sketch
    for i, index in enumerate(range(0, 16, 2)):
        x = conv(x, f"model.{index}", 2 if index in (4, 8, 12) else 1)
        if index != 14:
            x = F.silu(x)
    xs = [x]
    for i in range(3):
        x = conv(F.silu(x), f"downsample_layers.{i}.1", 2 if i < 2 else 1)
        xs.append(x)
    tok = [conv(f, f"proj_ins.{i}", 1, 0).flatten(2).transpose(1, 2) for i, f in enumerate(xs)]
    g = conv(xs[3].mean((2, 3), keepdim=True), "proj_ins.4", 1, 0).flatten(2).transpose(1, 2)
    T = torch.cat([g, tok[3], tok[2], tok[1], tok[0]], 1)
    grids = [xs[3].shape[-2:], xs[2].shape[-2:], xs[1].shape[-2:], xs[0].shape[-2:]]
    D = T.shape[-1]
    heads = D // 128

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q = rms(T @ sd["attn_layer.to_q.weight"].T, sd["attn_layer.q_norm.weight"]).view(1, -1, heads, 128)
    k = rms(T @ sd["attn_layer.to_k.weight"].T, sd["attn_layer.k_norm.weight"]).view(1, -1, heads, 128)
    v = (T @ sd["attn_layer.to_v.weight"].T).view(1, -1, heads, 128)
    freqs = torch.outer(torch.arange(1024.0, dtype=torch.float64),
                        1.0 / torch.pow(10000.0, torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    table = torch.polar(torch.ones_like(freqs), freqs)
    if rope == "cos":
        table = table.real.to(torch.float16).to(torch.complex128)

    def apply(t, h, w):
        z = torch.view_as_complex(t.double().reshape(1, h * w, heads, 64, 2).contiguous())
        f = torch.cat([table[:h].view(h, 1, 32).expand(h, w, 32), table[:w].view(1, w, 32).expand(h, w, 32)], -1)
        return torch.view_as_real(z * f.reshape(1, h * w, 1, 64)).flatten(3).float()

    start, outs = 0, []
    for j, (h, w) in enumerate(grids):
        n = h * w
        lo = start + (j == 0)
        q[:, lo:lo + n], k[:, lo:lo + n] = apply(q[:, lo:lo + n], h, w), apply(k[:, lo:lo + n], h, w)
        end = lo + n
        qs, ks, vs = (a.transpose(1, 2) for a in (q[:, start:end], k[:, :end], v[:, :end]))
        att = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(128), -1) @ vs
        outs.append(att.transpose(1, 2).reshape(1, -1, D))
        start = end
    A = torch.cat(outs, 1) @ sd["attn_layer.to_out.0.weight"].T + sd["attn_layer.to_out.0.bias"]
    T = T + A
    res, start = [], 1
    for (h, w), out_index in zip(grids, (3, 2, 1, 0)):
        part = T[:, start:start + h * w].transpose(1, 2).reshape(1, D, h, w)
        res.append(conv(part, f"proj_outs.{out_index}", 1, 0))
        start += h * w
    return res[::-1]


@pytest.fixture(scope="module")
def sketch_sd(xl_files):
    return read_tensors(xl_files["sdxl"], "control_encoder.")


@pytest.mark.parametrize("rope", ["rotation", "cos"])
def test_sketch_encoder_residuals_equal_the_restated_original(sketch_sd, rope):
    encoder = SketchEncoderXL.from_state_dict(sketch_sd, rope=rope).eval()
    g = torch.Generator().manual_seed(4)
    sketch = torch.rand(1, 3, 256, 192, generator=g) * 2 - 1
    with torch.no_grad():
        ours = encoder(sketch)
        theirs = restated_sketch_encoder(sketch_sd, sketch, rope)
    assert [tuple(r.shape) for r in ours] == [(1, 32, 32, 24), (1, 32, 16, 12), (1, 64, 8, 6), (1, 128, 8, 6)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # it can fail: the other RoPE form, or no causal order (every scale seeing every key), differ
    other = SketchEncoderXL.from_state_dict(sketch_sd, rope="cos" if rope == "rotation" else "rotation").eval()
    with torch.no_grad():
        assert not torch.allclose(other(sketch)[0], theirs[0], atol=1e-3)
        attn = encoder.attn_layer
        attn.forward = lambda tokens, grids, mode: _full_attention(attn, tokens)
        try:
            assert not torch.allclose(encoder(sketch)[0], theirs[0], atol=1e-3)
        finally:
            del attn.forward


def _full_attention(attn, tokens):
    q = attn.q_norm(attn.to_q(tokens)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = attn.k_norm(attn.to_k(tokens)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    v = attn.to_v(tokens).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    return attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


# --------------------------------------------------------------------------------------- projector (§3.4)
def test_projector_equals_the_restated_cluster_concat(xl_files):
    sd = read_tensors(xl_files["sdxl"], "proj.")
    proj = ClusterConcat.from_state_dict(sd).eval()
    g = torch.Generator().manual_seed(2)
    c, w = torch.randn(1, 257, 128, generator=g), torch.randn(1, 196, 128, generator=g)
    heads = 128 // 128

    def attention(x):
        q, k, v = (x @ sd[f"attn.to_{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(1, -1, heads, 128).transpose(1, 2) for t in (q, k, v))
        o = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), -1) @ v).transpose(1, 2).reshape(1, -1, 128)
        return o @ sd["attn.to_out.0.weight"].T + sd["attn.to_out.0.bias"]

    x = F.layer_norm(attention(c)[:, :196], (128,), sd["norm.weight"], sd["norm.bias"])
    x = torch.cat([x, w], 2)
    x = F.silu(x @ sd["proj.0.weight"].T + sd["proj.0.bias"]) @ sd["proj.2.weight"].T + sd["proj.2.bias"]
    expected = F.layer_norm(x, (64,), sd["proj.3.weight"], sd["proj.3.bias"])
    with torch.no_grad():
        ours = proj(c, w)
    assert ours.shape == (1, 196, 64)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # it can fail: the last 196 CLIP tokens (no class token) give another context
    with torch.no_grad():
        assert not torch.allclose(proj(torch.cat([c[:, 61:], c[:, :61]], 1), w), expected, atol=1e-3)
