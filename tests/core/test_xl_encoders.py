"""The XL reference encoders (method-xl §3): CLIP ViT-bigG-14 image tokens (from open_clip or transformers files),
the WD tagger tokens, the projector's context, staged loading and the weight files' messages. The original's maths
(transformers' CLIPVisionModelWithProjection, the tagger preprocessing) is restated here from method-xl.md."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_colorize.errors import CheckpointError, MissingWeights
from lib_colorize.models.clip import preprocess_reference
from lib_colorize.models.clip_xl import hf_to_open_clip, load_clip_bigg, preprocess_reference_xl
from lib_colorize.models.projector import ClusterConcat, ProjectorConfig
from lib_colorize.models.tagger import WD_TAGGER_ARCH, build_tagger, load_tagger, preprocess_tagger
from lib_colorize.models.xl_reference import XLReferenceEncoder
from lib_colorize.testing.xl_checkpoints import (TINY_BIGG_CONFIG, TINY_TAGGER_ARCH, clip_bigg_shapes,
                                                 hf_clip_shapes, make_clip_bigg_weights, make_tagger_weights,
                                                 tagger_shapes)
from lib_colorize.weights import CLIP_BIGG, WD_TAGGER, ensure_weight_file, find_weight_file

torch.set_num_threads(1)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-encoders")
    return {"hf": make_clip_bigg_weights(folder / "clip_vision_ViT-bigG-14.safetensors", seed=3, hf_format=True),
            "open_clip": make_clip_bigg_weights(folder / "open_clip_ViT-bigG-14.safetensors", seed=3),
            "tagger": make_tagger_weights(folder / "wd-v14-swin2-tagger.safetensors", seed=4)}


def reference_image(seed=0, size=(1, 3, 300, 200)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*size, generator=g) * 2 - 1


def restated_hf_clip(sd, reference):
    """transformers' CLIPVisionModelWithProjection (method-xl §3.1) on the stretched, normalised reference, then
    post_layernorm on all 257 tokens and visual_projection."""
    x = F.interpolate(reference, (224, 224), mode="bicubic", align_corners=True, antialias=True)
    x = ((x + 1) / 2 - MEAN) / STD
    p = "vision_model."
    width = sd[p + "embeddings.class_embedding"].shape[0]
    patches = F.conv2d(x, sd[p + "embeddings.patch_embedding.weight"], stride=14).flatten(2).transpose(1, 2)
    h = torch.cat([sd[p + "embeddings.class_embedding"].view(1, 1, -1), patches], 1)
    h = h + sd[p + "embeddings.position_embedding.weight"][None]
    h = F.layer_norm(h, (width,), sd[p + "pre_layrnorm.weight"], sd[p + "pre_layrnorm.bias"])
    heads = width // 32   # TINY_BIGG_CONFIG: head width 32
    layers = len({k.split(".")[3] for k in sd if k.startswith(p + "encoder.layers.")})
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        lin = lambda t, n: t @ sd[q + n + ".weight"].T + sd[q + n + ".bias"]
        r = h
        a = F.layer_norm(h, (width,), sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"])
        qs, ks, vs = (lin(a, f"self_attn.{n}_proj").view(1, -1, heads, width // heads).transpose(1, 2) for n in "qkv")
        att = torch.softmax((qs * (width // heads) ** -0.5) @ ks.transpose(-1, -2), -1) @ vs
        h = r + lin(att.transpose(1, 2).reshape(1, -1, width), "self_attn.out_proj")
        r = h
        m = F.layer_norm(h, (width,), sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"])
        h = r + lin(F.gelu(lin(m, "mlp.fc1")), "mlp.fc2")
    h = F.layer_norm(h, (width,), sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"])
    return h @ sd["visual_projection.weight"].T


def test_clip_tokens_equal_transformers_clip_from_either_file_format(files):
    from safetensors.torch import load_file, save_file

    reference = reference_image(1)
    expected = restated_hf_clip(load_file(files["hf"]), reference)
    assert expected.shape == (1, 257, 128)
    from_hf = load_clip_bigg(files["hf"], config=TINY_BIGG_CONFIG)
    torch.testing.assert_close(from_hf.encode_full(reference), expected, atol=2e-5, rtol=1e-4)
    # the same weights in open_clip's names (packed q/k/v, proj = Wᵀ) give the same tokens
    converted = {f"visual.{k}": v.contiguous() for k, v in hf_to_open_clip(load_file(files["hf"])).items()}
    assert set(converted) == set(clip_bigg_shapes(TINY_BIGG_CONFIG))
    path = files["hf"].replace("clip_vision_", "converted_")
    save_file(converted, path)
    torch.testing.assert_close(load_clip_bigg(path, config=TINY_BIGG_CONFIG).encode_full(reference), expected,
                               atol=2e-5, rtol=1e-4)
    # it can fail: the SD2.1 models' preprocessing (kornia blur, same squash) gives other tokens
    other = from_hf.tokens_from_pixels(preprocess_reference(reference, 224))
    assert not torch.allclose(other, expected, atol=1e-3)
    assert not torch.allclose(preprocess_reference_xl(reference), preprocess_reference(reference), atol=1e-3)


def test_clip_file_layouts_and_errors(files, tmp_path):
    assert len(hf_clip_shapes()) == 8 + 48 * 16 and clip_bigg_shapes()["visual.proj"] == (1664, 1280)
    n = sum(math.prod(s) for s in clip_bigg_shapes().values())
    assert n == 1_844_907_264                                   # method-xl §1.4
    with pytest.raises(CheckpointError, match="do not match ViT-bigG-14"):
        load_clip_bigg(files["open_clip"])                      # tiny weights against the real architecture
    from safetensors.torch import save_file
    save_file({"text.token_embedding.weight": torch.zeros(2, 2)}, str(tmp_path / "text-only.safetensors"))
    with pytest.raises(CheckpointError, match="no CLIP image-tower tensors"):
        load_clip_bigg(str(tmp_path / "text-only.safetensors"), config=TINY_BIGG_CONFIG)


def test_tagger_tokens_are_timms_features_of_the_bgr_stretched_reference(files):
    from safetensors.torch import load_file

    tagger = load_tagger(files["tagger"], arch=TINY_TAGGER_ARCH)
    reference = reference_image(2)
    timm_model = build_tagger(TINY_TAGGER_ARCH)
    timm_model.load_state_dict(load_file(files["tagger"]), strict=False)
    x = F.interpolate(reference, (448, 448), mode="bicubic", align_corners=True, antialias=True)[:, [2, 1, 0]]
    with torch.no_grad():
        expected = timm_model.forward_features(x).reshape(1, 196, -1)
        ours = tagger.encode(reference)
    assert ours.shape == (1, 196, 128)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # it can fail: RGB order gives other tokens
    with torch.no_grad():
        rgb = timm_model.forward_features(x[:, [2, 1, 0]]).reshape(1, 196, -1)
    assert not torch.allclose(rgb, expected, atol=1e-3)
    assert torch.equal(preprocess_tagger(reference)[:, 0], x[:, 0])


def test_tagger_full_size_layout_and_a_wrong_file(files):
    assert sum(math.prod(s) for s in tagger_shapes().values()) == 96_203_891    # method-xl §1.4
    with pytest.raises(CheckpointError, match="do not match"):
        load_tagger(files["tagger"], arch=WD_TAGGER_ARCH)
    assert load_tagger(files["tagger"]).image_size == 448        # the architecture read from the file


def test_context_is_the_projection_of_both_encoders_and_the_encoders_are_staged(files):
    torch.manual_seed(0)
    projector = ClusterConcat(ProjectorConfig(clip_dim=128, wd_dim=128, output_dim=64)).eval()
    loads = []

    def load_clip():
        loads.append("clip")
        return load_clip_bigg(files["hf"], config=TINY_BIGG_CONFIG)

    def load_wd():
        loads.append("tagger")
        return load_tagger(files["tagger"], arch=TINY_TAGGER_ARCH)

    encoder = XLReferenceEncoder(load_clip, load_wd, projector)
    reference = reference_image(3)
    context = encoder.encode_full(reference)
    with torch.no_grad():
        expected = projector(load_clip().encode_full(reference), load_wd().encode(reference))
    torch.testing.assert_close(context, expected, atol=1e-6, rtol=1e-6)
    assert context.shape == (1, 196, 64)
    # CPU default: each encoder is loaded for its encode and dropped afterwards; one stage at a time
    assert encoder.keep == "none" and not encoder._loaded
    assert [s["stage"] for s in encoder.stages] == ["clip", "tagger"]
    assert all(s["parameter_bytes"] > 0 for s in encoder.stages)
    kept = XLReferenceEncoder(load_clip, load_wd, projector, keep="cpu")
    before = len(loads)
    kept.encode_full(reference), kept.encode_full(reference)
    assert loads[before:] == ["clip", "tagger"]


def test_weight_files_are_found_by_name_and_missing_ones_are_named(tmp_path, monkeypatch):
    assert find_weight_file(CLIP_BIGG, tmp_path) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeights) as error:
        ensure_weight_file(CLIP_BIGG, tmp_path)
    message = str(error.value)
    assert "open_clip_ViT-bigG-14.safetensors" in message and str(tmp_path) in message
    assert "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k/resolve/main/open_clip_model.safetensors" in message
    with pytest.raises(MissingWeights, match="wd-v14-swin2-tagger.safetensors"):
        ensure_weight_file(WD_TAGGER, tmp_path)
    (tmp_path / "wd-v1-4-swinv2-tagger-v2.safetensors").write_bytes(b"x")
    assert ensure_weight_file(WD_TAGGER, tmp_path).name == "wd-v1-4-swinv2-tagger-v2.safetensors"
    assert CLIP_BIGG.url("https://mirror.example") == ("https://mirror.example/laion/CLIP-ViT-bigG-14-laion2B-39B-b160k/"
                                                       "resolve/main/open_clip_model.safetensors")
