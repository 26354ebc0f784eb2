"""Reference and text encoders of method §2 / §2.5 on a tiny random open_clip model (method §10.3 #12-13).

Every expected value is restated here independently of ``lib_colorize.models.clip``: the kornia-form resize from
the §2.1 formula (numpy), the ViT and text forwards as explicit float64 matmuls over the state dict. The open_clip
3.x parity test needs CD_OPENCLIP_NEW (a ``pip install --no-deps --target`` directory with open_clip_torch 3.3.0).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib_colorize.weights import store as weights_store
from lib_colorize.errors import CheckpointError, InvalidInput, MissingWeights
from lib_colorize.models import clip as clip_mod
from lib_colorize.models.clip import (
    HF_FILENAME,
    HF_REPO_VIT_H,
    ReferenceTokenCache,
    count_tokens,
    kornia_resize,
    load_clip,
    preprocess_reference,
    resolve_clip_weights,
)
from lib_colorize.testing.clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_tiny_clip_model, make_tiny_clip_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a girl with red hair", "blue sky!", ""]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _image(seed: int, h: int, w: int, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory) -> str:
    return make_tiny_clip_weights(str(tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"), seed=3)


@pytest.fixture(scope="module")
def encoders(weights_path):
    return load_clip(TINY_CLIP_NAME, weights=weights_path)


@pytest.fixture(scope="module")
def sd(weights_path):
    return {k: v.double() for k, v in torch.load(weights_path, map_location="cpu", weights_only=True).items()}


# ------------------------------------------------------------------------------------------------ shapes


def test_token_shapes(encoders):
    img = _image(0, 320, 288, b=2)
    full = encoders.reference.encode_full(img)
    local = encoders.reference.encode_local(img)
    d = TINY_CLIP_CONFIG["embed_dim"]
    assert full.shape == (2, 257, d) and full.dtype == torch.float32
    assert local.shape == (2, 256, d)
    assert torch.equal(local, full[:, 1:])
    assert encoders.reference.num_tokens == 257 and encoders.reference.output_dim == d


def test_rejects_non_rgb_batch(encoders):
    with pytest.raises(InvalidInput) as e:
        encoders.reference.encode_full(torch.zeros(3, 64, 64))
    assert e.value.field == "reference"


# ------------------------------------------------------------------------------------------------ preprocessing §2.1


def _np_taps(sigma: float) -> np.ndarray:
    k = int(max(4 * sigma, 3))
    k += 1 - k % 2
    i = np.arange(k) - k // 2
    g = np.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def _np_correlate_last(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    p = len(taps) // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)], mode="reflect")
    n = x.shape[-1]
    return sum(t * xp[..., j : j + n] for j, t in enumerate(taps))


def _np_resize(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """§2.1 restated: Gaussian pre-blur (numpy, if downscaling), then bicubic align_corners (no clamp)."""
    x = img.double().numpy()
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return img.double()
    fy, fx = h / size, w / size
    if max(fy, fx) > 1:
        x = _np_correlate_last(x, _np_taps(max((fx - 1) / 2, 0.001)))  # along W
        x = np.swapaxes(_np_correlate_last(np.swapaxes(x, -1, -2), _np_taps(max((fy - 1) / 2, 0.001))), -1, -2)
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    return F.interpolate(t, size=(size, size), mode="bicubic", align_corners=True).double()


def _np_normalize(x: torch.Tensor) -> torch.Tensor:
    y = x.double().numpy()
    return torch.from_numpy(((y + 1) / 2 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1))


@pytest.mark.parametrize("hw", [(512, 384), (1000, 700), (300, 200), (160, 128), (224, 224), (2000, 230)])
def test_preprocess_matches_formula(hw):
    img = _image(1, *hw, b=2)
    expected = _np_resize(img)
    assert (kornia_resize(img, (224, 224)).double() - expected).abs().max().item() <= 1e-6
    ours = preprocess_reference(img)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    # normalisation divides by std (about 0.26): the 1e-6 bound scales with 1/std
    assert (ours.double() - _np_normalize(expected)).abs().max().item() <= 1e-6 / STD.min()


def test_kernel_sizes_follow_formula():
    # f = 1000/224 -> sigma = 1.732 -> 4 sigma = 6.93 -> 6 -> odd 7; sigma 0.001 -> 3 taps (a delta)
    assert clip_mod.gaussian_taps(clip_mod.antialias_sigma(1000 / 224)).numel() == 7
    delta = clip_mod.gaussian_taps(clip_mod.antialias_sigma(0.5))
    assert delta.tolist() == [0.0, 1.0, 0.0]


def test_resize_matches_kornia():
    kornia = pytest.importorskip("kornia", reason="kornia not installed; the formula test covers the same maths")
    for hw in [(512, 384), (1000, 700), (300, 200), (160, 128)]:
        x = _image(2, *hw)
        ref = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
        assert (kornia_resize(x, (224, 224)) - ref).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------ forwards §2.2, §2.5


def _ln(x, sd, prefix, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _block(x, sd, prefix, heads, mask=None):
    """open_clip residual block with explicit matmuls: pre-LN MHA + pre-LN GELU MLP (no layer scale)."""
    b, n, d = x.shape
    hd = d // heads
    y = _ln(x, sd, prefix + ".ln_1")
    qkv = y @ sd[prefix + ".attn.in_proj_weight"].T + sd[prefix + ".attn.in_proj_bias"]
    q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, n, heads, hd).transpose(1, 2) for i in range(3))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        s = s + mask
    o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ sd[prefix + ".attn.out_proj.weight"].T + sd[prefix + ".attn.out_proj.bias"]
    y = _ln(x, sd, prefix + ".ln_2") @ sd[prefix + ".mlp.c_fc.weight"].T + sd[prefix + ".mlp.c_fc.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return x + y @ sd[prefix + ".mlp.c_proj.weight"].T + sd[prefix + ".mlp.c_proj.bias"]


def _restated_image_tokens(pixels: torch.Tensor, sd) -> torch.Tensor:
    """§2.2: patches @ conv1, [cls; patches] + P, ln_pre, blocks, ln_post and proj on all tokens (float64)."""
    vc = TINY_CLIP_CONFIG["vision_cfg"]
    p, g, w = vc["patch_size"], vc["image_size"] // vc["patch_size"], vc["width"]
    x = pixels.double()
    b = x.shape[0]
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    t = patches @ sd["visual.conv1.weight"].reshape(w, -1).T
    t = torch.cat([sd["visual.class_embedding"].expand(b, 1, w), t], dim=1) + sd["visual.positional_embedding"]
    t = _ln(t, sd, "visual.ln_pre")
    for i in range(vc["layers"]):
        t = _block(t, sd, f"visual.transformer.resblocks.{i}", heads=w // vc["head_width"])
    return _ln(t, sd, "visual.ln_post") @ sd["visual.proj"]


def _restated_text(prompts, sd) -> torch.Tensor:
    """§2.5: token + positional embedding, causal blocks, ln_final, EOT (argmax id) @ text_projection, L2 norm."""
    import open_clip

    tc = TINY_CLIP_CONFIG["text_cfg"]
    tok = open_clip.tokenize(prompts)
    x = sd["token_embedding.weight"][tok] + sd["positional_embedding"]
    n = tok.shape[1]
    mask = torch.triu(torch.full((n, n), float("-inf"), dtype=torch.float64), diagonal=1)
    for i in range(tc["layers"]):
        x = _block(x, sd, f"transformer.resblocks.{i}", heads=tc["heads"], mask=mask)
    x = _ln(x, sd, "ln_final")
    e = x[torch.arange(len(prompts)), tok.argmax(-1)] @ sd["text_projection"]
    return e / e.norm(dim=-1, keepdim=True)


def test_image_tokens_match_restated_vit(encoders, sd):
    img = _image(4, 400, 352, b=2)
    ours = encoders.reference.encode_full(img)
    ref = _restated_image_tokens(preprocess_reference(img), sd)
    assert _rel(ours, ref) <= 1e-5
    # the patch tokens are projected too (not only the pooled token): a non-trivial comparison
    assert ref[:, 1:].abs().max() > 0.1


def test_class_token_matches_open_clip_pooled_output(encoders, weights_path):
    model = make_tiny_clip_model(seed=3)  # same seed -> same weights as the file
    img = _image(5, 256, 256)
    with torch.no_grad():
        pooled = model.encode_image(preprocess_reference(img))
    assert _rel(encoders.reference.encode_full(img)[:, 0], pooled) <= 1e-5


def test_text_embeddings_unit_norm_and_restated(encoders, sd):
    import open_clip

    e = encoders.text.encode(PROMPTS)
    assert e.shape == (len(PROMPTS), 1, TINY_CLIP_CONFIG["embed_dim"])
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(PROMPTS), 1), atol=1e-6)
    assert _rel(e[:, 0], _restated_text(PROMPTS, sd)) <= 1e-5
    model = make_tiny_clip_model(seed=3)
    with torch.no_grad():
        theirs = model.encode_text(open_clip.tokenize(PROMPTS), normalize=True)
    assert _rel(e[:, 0], theirs) <= 1e-5


def test_prompt_length_limit(encoders):
    assert count_tokens("a red dress") == 3
    ok = " ".join(["red"] * 75)
    assert count_tokens(ok) == 75
    encoders.text.encode([ok])
    long = " ".join(["red"] * 76)
    with pytest.raises(InvalidInput) as e:
        encoders.text.encode(["hair", long])
    assert e.value.field == "manipulations"
    assert "75 tokens" in str(e.value) and "red red red" in str(e.value)


# ------------------------------------------------------------------------------------------------ open_clip 3.x parity

_PARITY_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch, open_clip, open_clip.version
    from lib_colorize.models.clip import load_clip, preprocess_reference
    from lib_colorize.testing.clip import TINY_CLIP_NAME, register_tiny_clip
    weights, inputs, out = sys.argv[1:4]
    data = torch.load(inputs, weights_only=True)
    register_tiny_clip()
    enc = load_clip(TINY_CLIP_NAME, weights=weights)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    prompts = json.loads(sys.argv[4])
    with torch.no_grad():
        own_pooled = model.encode_image(preprocess_reference(data["image"]))
        own_text = model.encode_text(open_clip.tokenize(prompts), normalize=True)
    torch.save({
        "full": enc.reference.encode_full(data["image"]),
        "text": enc.text.encode(prompts),
        "own_pooled": own_pooled,
        "own_text": own_text,
    }, out)
    print(json.dumps({
        "version": open_clip.version.__version__,
        "file": open_clip.__file__,
        "batch_first": bool(getattr(model.visual.transformer, "batch_first", False)),
    }))
    """
)


def test_open_clip_new_parity(encoders, weights_path, tmp_path):
    target = os.environ.get("CD_OPENCLIP_NEW")
    if not target:
        pytest.skip(
            "CD_OPENCLIP_NEW is not set: run `pip install --no-deps --target DIR open_clip_torch==3.3.0` "
            "and export CD_OPENCLIP_NEW=DIR to compare with the batch-first open_clip 3.x"
        )
    img = _image(6, 300, 260, b=2)
    inputs = tmp_path / "inputs.pt"
    torch.save({"image": img}, inputs)
    out = tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([target, str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", _PARITY_SCRIPT, weights_path, str(inputs), str(out), json.dumps(PROMPTS)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(Path(target).resolve()), info
    assert int(info["version"].split(".")[0]) >= 3 and info["batch_first"], info
    new = torch.load(out, weights_only=True)
    full, text = encoders.reference.encode_full(img), encoders.text.encode(PROMPTS)
    assert _rel(new["full"], full) <= 1e-5
    assert _rel(new["text"], text) <= 1e-5
    # and open_clip 3.x's own forwards agree with our class token / text embedding
    assert _rel(new["own_pooled"], full[:, 0]) <= 1e-5
    assert _rel(new["own_text"], text[:, 0]) <= 1e-5


# ------------------------------------------------------------------------------------------------ token cache


def test_cache_hits_misses_and_eviction(encoders):
    enc = encoders.reference
    cache = ReferenceTokenCache(max_entries=2)
    a, b, c = _image(10, 256, 256), _image(11, 256, 256), _image(12, 256, 256)
    first = cache.get_or_encode(enc, a)
    again = cache.get_or_encode(enc, a.clone())  # same content, other tensor object
    assert cache.encode_calls == 1 and torch.equal(first, again)
    assert torch.equal(first, enc.encode_full(a))
    again.zero_()  # callers get copies
    assert torch.equal(cache.get_or_encode(enc, a), first) and cache.encode_calls == 1
    assert torch.equal(cache.get_or_encode(enc, a, local=True), first[:, 1:])
    cache.get_or_encode(enc, b)
    assert cache.encode_calls == 2
    cache.get_or_encode(enc, a)  # a is now the most recent
    cache.get_or_encode(enc, c)  # evicts b
    assert cache.encode_calls == 3 and len(cache) == 2
    cache.get_or_encode(enc, a)
    assert cache.encode_calls == 3
    cache.get_or_encode(enc, b)
    assert cache.encode_calls == 4
    cache.clear()
    assert len(cache) == 0
    cache.get_or_encode(enc, a)
    assert cache.encode_calls == 5


def test_cache_key_includes_encoder_and_dtype(encoders, weights_path):
    cache = ReferenceTokenCache()
    img = _image(13, 128, 128)
    cache.get_or_encode(encoders.reference, img)
    other = load_clip(TINY_CLIP_NAME, weights=weights_path, towers=("visual",)).reference
    cache.get_or_encode(other, img)
    cache.get_or_encode(encoders.reference, img.double())
    assert cache.encode_calls == 3


# ------------------------------------------------------------------------------------------------ weights resolution


@pytest.fixture
def no_download(monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("hf_hub_download must not be called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)


def test_missing_weights_offline_names_file_and_folder(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeights) as e:
        resolve_clip_weights(models_dir=str(tmp_path))
    msg = str(e.value)
    assert HF_FILENAME in msg and str(tmp_path.resolve()) in msg and HF_REPO_VIT_H in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(MissingWeights):
        load_clip(models_dir=str(tmp_path), allow_download=False)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(MissingWeights, match="nope.bin"):
        resolve_clip_weights(weights=str(tmp_path / "nope.bin"))


def test_download_path(tmp_path, monkeypatch, weights_path):
    import huggingface_hub

    calls = []

    def fake(repo_id, filename, local_dir=None, **kwargs):
        calls.append((repo_id, filename, local_dir))
        dst = Path(local_dir) / filename
        dst.write_bytes(Path(weights_path).read_bytes())
        return str(dst)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(weights_store, "unreachable", lambda endpoint=None: None)   # the fake hub is up
    models_dir = tmp_path / "clip"
    path = resolve_clip_weights(models_dir=str(models_dir))
    assert [(repo, name) for repo, name, _ in calls] == [(HF_REPO_VIT_H, HF_FILENAME)]
    assert Path(calls[0][2]).is_relative_to(models_dir)   # fetched into a staging folder of the models folder...
    assert path == str(models_dir / HF_FILENAME)          # ...then given its final name; no staging left behind
    assert sorted(p.name for p in models_dir.iterdir()) == [HF_FILENAME]
    # second time the file is found locally, no download
    assert resolve_clip_weights(models_dir=str(models_dir)) == path and len(calls) == 1
    # the same path through load_clip (tiny arch posing as one with the ViT-H download source)
    from lib_colorize import weights

    monkeypatch.setattr(clip_mod.loading, "clip_weight_file", lambda arch, pretrained: weights.CLIP_VIT_H)
    enc = load_clip(TINY_CLIP_NAME, models_dir=str(tmp_path / "other"), towers=("text",))
    assert enc.reference is None and enc.weights_path == str(tmp_path / "other" / HF_FILENAME)
    assert enc.text.encode(["x"]).shape == (1, 1, TINY_CLIP_CONFIG["embed_dim"])


def test_download_failure_is_missing_weights(tmp_path, monkeypatch):
    import huggingface_hub

    def boom(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(weights_store, "unreachable", lambda endpoint=None: None)   # the fake hub is up
    with pytest.raises(MissingWeights) as e:
        resolve_clip_weights(models_dir=str(tmp_path))
    assert "no route to host" in str(e.value) and HF_FILENAME in str(e.value)


def test_models_dir_lookup_and_safetensors(tmp_path, encoders, no_download):
    """An architecture other than ViT-H-14 has its own file name, so it never picks up the ViT-H file."""
    make_tiny_clip_weights(str(tmp_path / "open_clip_pytorch_model.safetensors"), seed=3)
    with pytest.raises(MissingWeights, match=f"open_clip_{TINY_CLIP_NAME}.safetensors"):
        load_clip(TINY_CLIP_NAME, models_dir=str(tmp_path))
    path = make_tiny_clip_weights(str(tmp_path / f"open_clip_{TINY_CLIP_NAME}.safetensors"), seed=3)
    enc = load_clip(TINY_CLIP_NAME, models_dir=str(tmp_path))
    assert enc.weights_path == path
    img = _image(7, 224, 224)
    assert torch.equal(enc.reference.encode_full(img), encoders.reference.encode_full(img))


def test_only_the_requested_tower_is_built_and_nothing_is_initialised(weights_path, monkeypatch):
    """Loading the image tower builds no text tower and runs no random initialisation on real memory: the
    tensors are assigned straight from the file."""
    import open_clip.model

    from lib_colorize.module_info import parameter_bytes

    def no_text_tower(*args, **kwargs):
        raise AssertionError("the text tower was built")

    real_memory_inits = []
    original_normal = torch.nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        if not tensor.is_meta:
            real_memory_inits.append(tuple(tensor.shape))
        return original_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(open_clip.model, "_build_text_tower", no_text_tower)
    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    loaded = load_clip(TINY_CLIP_NAME, weights=weights_path, towers=("visual",))
    assert loaded.text is None and real_memory_inits == []
    stored = torch.load(weights_path, weights_only=True)
    visual_bytes = sum(v.numel() * v.element_size() for k, v in stored.items() if k.startswith("visual."))
    assert loaded.parameter_bytes() == {"visual": visual_bytes, "text": 0}
    assert parameter_bytes(loaded.reference) == visual_bytes
    for key, value in loaded.reference.visual.state_dict().items():
        assert torch.equal(value, stored["visual." + key]), key


def test_bad_weight_files(tmp_path, weights_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_clip(TINY_CLIP_NAME, weights=str(junk))
    sd = torch.load(weights_path, weights_only=True)
    sd["visual.proj"] = torch.zeros(64, 16)
    bad = tmp_path / "bad.bin"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match="wrong shape: proj"):
        load_clip(TINY_CLIP_NAME, weights=str(bad))
