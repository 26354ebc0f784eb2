"""Line extractors for sketch_mode="extract" (method §8.2): registry, processing formulas, key layouts of the public
weight files, the weight loading path (find / download / refuse), and the model-free lineart_standard.

Networks use random weights; images are small (<= 64 px). Expected key layouts are written here from the public
architectures (Anime2Sketch pix2pix U-Net ``netG.pth``, Erika ``res_skip`` ``erika.pth``, SketchKeras
``tellurion/line_extractor/model.pth``), independently of the implementation.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from lib_colorize.weights import store as weights_store
from lib_colorize import extractors as ex
from lib_colorize.errors import CheckpointError, InvalidInput, MissingWeights
from lib_colorize.extractors import anime2sketch, erika, sketch_keras

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_cache():
    ex.unload_extractors()
    yield
    ex.unload_extractors()


def _white(size=64, mode="RGB"):
    return Image.new(mode, (size, size), (255, 255, 255) if mode == "RGB" else (255, 255, 255, 0))


def _line_image(size=64):
    """White page with a black vertical stroke (columns 30..32) and a grey diagonal."""
    a = np.full((size, size, 3), 255, np.uint8)
    a[:, 30:33] = 0
    for i in range(size):
        a[i, i] = 128
    return Image.fromarray(a)


def _random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- registry
def test_registry_names_and_sources():
    assert set(ex.EXTRACTORS) == {"lineart_standard", "lineart", "lineart_denoise", "lineart_keras"}
    assert ex.DEFAULT_EXTRACTOR == "lineart_keras"
    for name, spec in ex.EXTRACTORS.items():
        assert spec.name == name and spec.label
    std = ex.EXTRACTORS["lineart_standard"]
    assert not std.needs_weights and std.weight_file is None and std.source_url is None
    assert ex.EXTRACTORS["lineart"].source_url == "https://huggingface.co/lllyasviel/Annotators/resolve/main/netG.pth"
    assert ex.EXTRACTORS["lineart_denoise"].source_url == \
        "https://huggingface.co/lllyasviel/Annotators/resolve/main/erika.pth"
    keras = ex.EXTRACTORS["lineart_keras"]
    assert keras.source_url == "https://huggingface.co/tellurion/line_extractor/resolve/main/model.pth"
    assert keras.weight_file == "sketchKeras.pth"
    assert keras.weights.folder == "ColorizeDiffusion" and keras.weights.accepted_names == ("sketchKeras.pth",
                                                                                          "sketchKeras.safetensors")


@pytest.mark.parametrize("name", ["nope", "", "../netG", "netG.pth", None, "LINEART"])
def test_unknown_name_rejected(name, tmp_path):
    with pytest.raises(InvalidInput) as info:
        ex.extract_lines(name, _white(), 64, models_dir=tmp_path)
    assert info.value.field == "line_extractor"
    for valid in ex.EXTRACTORS:
        assert valid in str(info.value)


@pytest.mark.parametrize("size", [0, 8, 64.0, True, 10 ** 5])
def test_bad_size_rejected(size):
    with pytest.raises(InvalidInput):
        ex.extract_lines("lineart_standard", _white(), size)


# ------------------------------------------------------------------------------------ lineart_standard
def _standard_reference(image: Image.Image, size: int) -> np.ndarray:
    """ControlNet lineart_standard computed independently: explicit separable Gaussian kernel (sigma 6, size 49,
    OpenCV's default for float images), reflect-101 border, median normalisation, uint8 truncation."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32)
    k = cv2.getGaussianKernel(49, 6.0, cv2.CV_32F)
    g = cv2.sepFilter2D(rgb, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)
    inten = np.clip((g - rgb).min(axis=2), 0, 255)
    sel = inten[inten > 8]
    scale = max(16.0, float(np.median(sel))) if sel.size else 16.0
    u8 = np.clip(inten / scale * 127, 0, 255).astype(np.uint8)
    return u8.astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("image,size", [(_line_image(64), 64), (_random_image(80, 48), 64), (_line_image(40), 48)])
def test_lineart_standard_matches_definition(image, size):
    out = ex.extract_lines("lineart_standard", image, size)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    expected = _standard_reference(image, size)
    diff = np.abs(out[0, 0].numpy() - expected)
    assert diff.max() <= 2 / 127.5 + 1e-6  # uint8 truncation may flip by one level where blur rounding differs
    assert (diff > 1e-6).mean() < 0.01


def test_lineart_standard_domain():
    blank = ex.extract_lines("lineart_standard", _white(), 64)
    assert torch.all(blank == -1)
    transparent = ex.extract_lines("lineart_standard", _white(64, "RGBA"), 64)  # composited over white
    assert torch.all(transparent == -1)
    out = ex.extract_lines("lineart_standard", _line_image(), 64)
    assert out.min() >= -1 and out.max() <= 1
    line = out[0, 0, 5:25, 30:33]
    background = out[0, 0, 5:25, 45:60]  # away from the stroke and the grey diagonal
    # the median line intensity is normalised to 127 (tensor value ~0), lines are far above the -1 background
    assert torch.all(background == -1) and torch.all(line > -0.1)


# --------------------------------------------------------------------- processing formulas (stub networks)
class _Recorder:
    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return self.fn(x)


def test_anime2sketch_processing():
    rgb = np.array(_line_image(40))
    stub = _Recorder(lambda x: torch.tanh(x[:, :1] * 3))
    out = anime2sketch.run(stub, rgb, torch.device("cpu"), torch.float32)
    assert out.shape == (1, 3, 40, 40)
    x = stub.inputs[0]
    assert x.shape == (1, 3, 256, 256)  # padded to the U-Net stride
    inner = x[:, :, 108:148, 108:148]
    assert torch.allclose(inner, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1, atol=1e-6)
    expected = -torch.tanh(inner[:, :1] * 3)
    assert torch.allclose(out, expected.repeat(1, 3, 1, 1), atol=1e-6)
    assert out[0, 0, 0, 20] < -0.99 and out[0, 0, 5, 31] > 0.99  # paper -> -1, black stroke -> +1


def test_erika_processing():
    rgb = np.asarray(_line_image(48)).copy()
    rgb[..., 1:] = 7  # only the R channel is used
    stub = _Recorder(lambda x: x * 1.5 - 20)
    out = erika.run(stub, rgb, torch.device("cpu"), torch.float32)
    x = stub.inputs[0]
    assert x.shape == (1, 1, 48, 48)
    assert torch.allclose(x[0, 0], torch.from_numpy(rgb[..., 0]).float(), atol=1e-4)
    y = (torch.from_numpy(rgb[..., 0]).float() * 1.5 - 20).clamp(0, 255) / 127.5 - 1
    assert torch.allclose(out, -y.expand(1, 3, 48, 48), atol=1e-5)
    assert out[0, 0, 0, 40] == -1 and out[0, 0, 5, 31] == 1
    erika.run(stub, rgb[:40, :40], torch.device("cpu"), torch.float32)
    assert stub.inputs[-1].shape == (1, 1, 48, 48)


def test_sketch_keras_processing():
    rgb = np.asarray(_random_image(32, 32, seed=3))
    stub = _Recorder(lambda x: x * 0.8 + 0.05)
    out = sketch_keras.run(stub, rgb, torch.device("cpu"), torch.float32)
    x = stub.inputs[0]
    assert x.shape == (3, 1, 32, 32)  # the three channels as a batch of one-channel images
    blurred = cv2.GaussianBlur(rgb, (0, 0), 3)
    hp = (rgb.astype(np.int32) - blurred.astype(np.int32)) / 127.5
    hp = hp / hp.max()
    assert np.allclose(x[:, 0].permute(1, 2, 0).numpy(), hp, atol=1e-6)
    p = (hp * 0.8 + 0.05).max(axis=2)
    p[p < 0.1] = 0
    expected = np.clip((p - 0.5) * 2, -1, 1)
    assert out.shape == (1, 3, 32, 32)
    assert np.allclose(out[0, 0].numpy(), expected, atol=1e-5) and torch.equal(out[:, 0], out[:, 2])
    flat = sketch_keras.run(_Recorder(lambda x: x), np.full((16, 16, 3), 200, np.uint8), "cpu", torch.float32)
    assert torch.all(flat == -1)  # no division by zero on a flat image


# ------------------------------------------------------------------------- key layouts of the public files
def _conv(k_in, k_out, k, bias=True, transposed=False):
    w = (k_in, k_out, k, k) if transposed else (k_out, k_in, k, k)
    return {"weight": w, **({"bias": (k_out,)} if bias else {})}


def _bn(c):
    return {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()}


def _put(d, prefix, entries):
    for k, v in entries.items():
        d[f"{prefix}.{k}"] = v


def _anime2sketch_layout():
    """pix2pix UnetGenerator(3, 1, num_downs=8, ngf=64, InstanceNorm(affine=False)): convs have biases."""
    d = {}
    outer = [1, 64, 128, 256, 512, 512, 512, 512]   # out channels of each level's transposed conv
    inner = [64, 128, 256, 512, 512, 512, 512, 512]
    prefix = "model.model"
    _put(d, f"{prefix}.0", _conv(3, 64, 4))
    _put(d, f"{prefix}.3", _conv(128, 1, 4, transposed=True))
    for level in range(1, 8):
        prefix += ".1.model" if level == 1 else ".3.model"
        _put(d, f"{prefix}.1", _conv(outer[level], inner[level], 4))
        up_in = inner[level] if level == 7 else 2 * inner[level]
        _put(d, f"{prefix}.{3 if level == 7 else 5}", _conv(up_in, outer[level], 4, transposed=True))
    return d


def _erika_layout():
    d = {}
    table = [(0, 1, 24, 2, ""), (1, 24, 48, 3, "d"), (2, 48, 96, 5, "d"), (3, 96, 192, 7, "d"),
             (4, 192, 384, 12, "d"), (5, 384, 192, 7, "u"), (6, 192, 96, 5, "u"), (7, 96, 48, 3, "u"),
             (8, 48, 24, 2, "u"), (9, 24, 16, 2, "")]
    for idx, cin, cout, reps, kind in table:
        for i in range(reps):
            p = f"block{idx}.model.{i}"
            c_first = cin if i == 0 else cout
            _put(d, f"{p}.conv1.model.0", _bn(c_first))
            _put(d, f"{p}.conv1.model.2", _conv(c_first, cout, 3))
            _put(d, f"{p}.residual.model.0", _bn(cout))
            _put(d, f"{p}.residual.model.2", _conv(cout, cout, 3))
            strided = kind == "d" and i == reps - 1
            if c_first != cout or strided:
                _put(d, f"{p}.shortcut.model.0", _conv(c_first, cout, 1))
    _put(d, "conv15.model.0", _bn(16))
    _put(d, "conv15.model.2", _conv(16, 1, 1))
    return d


def _sketch_keras_layout():
    d = {}
    _put(d, "downblock_1.1", _conv(1, 32, 3)); _put(d, "downblock_1.2", _bn(32))
    for i, c in ((2, 32), (3, 64), (4, 128)):
        _put(d, f"downblock_{i}.1", _conv(c, 2 * c, 4)); _put(d, f"downblock_{i}.2", _bn(2 * c))
        _put(d, f"downblock_{i}.5", _conv(2 * c, 2 * c, 3)); _put(d, f"downblock_{i}.6", _bn(2 * c))
    _put(d, "downblock_5.1", _conv(256, 512, 4)); _put(d, "downblock_5.2", _bn(512))
    _put(d, "downblock_6.1", _conv(512, 512, 3)); _put(d, "downblock_6.2", _bn(512))
    for i, (cin, cmid, cout) in enumerate(((1024, 512, 256), (512, 256, 128), (256, 128, 64), (128, 64, 32)), 1):
        _put(d, f"upblock_{i}.2", _conv(cin, cmid, 4)); _put(d, f"upblock_{i}.3", _bn(cmid))
        _put(d, f"upblock_{i}.6", _conv(cmid, cout, 3)); _put(d, f"upblock_{i}.7", _bn(cout))
    _put(d, "last_conv", _conv(64, 1, 3))
    return d


LAYOUTS = {"lineart": (anime2sketch, _anime2sketch_layout, 54_405_505),
           "lineart_denoise": (erika, _erika_layout, None),
           "lineart_keras": (sketch_keras, _sketch_keras_layout, None)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout(name):
    module, layout, n_params = LAYOUTS[name]
    net = module.build_network()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = layout()
    assert sorted(got) == sorted(expected)
    assert got == expected
    if n_params is not None:  # netG.pth is a 218 MB float32 file: 54.4 M parameters
        assert sum(p.numel() for p in net.parameters()) == n_params


# ------------------------------------------------------------------------------- loading from models_dir
def _randomise(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():  # conv weights with gain ~0.5 keep the deep nets' activations finite
                std = 0.5 / t[0].numel() ** 0.5 if t.dim() > 1 else 0.1
                t.copy_(torch.randn(t.shape, generator=g) * std)
    return net


def _save(state, path, *, prefix="", wrap=False, drop_counters=False):
    sd = {prefix + k: v.clone() for k, v in state.items() if not (drop_counters and k.endswith("num_batches_tracked"))}
    torch.save({"state_dict": sd} if wrap else sd, path)


@pytest.mark.parametrize("name,prefix,wrap,drop", [("lineart", "module.", False, False),
                                                   ("lineart_denoise", "module.", True, False),
                                                   ("lineart_keras", "", False, True)])
def test_learned_extractor_loads_and_runs(name, prefix, wrap, drop, tmp_path, monkeypatch):
    module = LAYOUTS[name][0]
    source = _randomise(module.build_network())
    spec = ex.EXTRACTORS[name]
    _save(source.state_dict(), tmp_path / spec.weight_file, prefix=prefix, wrap=wrap, drop_counters=drop)
    assert ex.find_weights(name, tmp_path) == tmp_path / spec.weight_file

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    image = _random_image(40, 56, seed=1)
    out = ex.extract_lines(name, image, 48, models_dir=tmp_path)
    assert out.shape == (1, 3, 48, 48) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])

    net = ex.load_extractor(name, models_dir=tmp_path)
    assert not net.training
    loaded = net.state_dict()
    for k, v in source.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded[k], v), k
    # the cached network is reused, and extract_lines == the module's processing on the loaded network
    assert ex.load_extractor(name, models_dir=tmp_path) is net
    square = np.asarray(image.resize((48, 48), Image.BICUBIC))
    with torch.no_grad():
        ref = module.run(source, square, torch.device("cpu"), torch.float32)
    assert torch.allclose(out, ref, atol=1e-5)
    ex.unload_extractors()
    assert ex.load_extractor(name, models_dir=tmp_path) is not net


def test_lineart_standard_needs_no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = ex.extract_lines("lineart_standard", _line_image(), 64, models_dir=tmp_path)
    assert out.shape == (1, 3, 64, 64) and not any(tmp_path.iterdir())


def _no_network(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.mark.parametrize("name", ["lineart", "lineart_denoise", "lineart_keras"])
def test_missing_weights_offline(name, tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ex.EXTRACTORS[name]
    with pytest.raises(MissingWeights) as info:
        ex.extract_lines(name, _white(), 64, models_dir=tmp_path, allow_download=True)
    message = str(info.value)
    assert spec.weight_file in message and str(tmp_path) in message and spec.source_url in message
    assert "HF_HUB_OFFLINE" in message
    assert not any(tmp_path.iterdir())


def test_missing_weights_download_disabled(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MissingWeights, match="sketchKeras.pth"):
        ex.extract_lines("lineart_keras", _white(), 64, models_dir=tmp_path, allow_download=False)


def test_download_into_models_dir(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    state = _randomise(sketch_keras.build_network()).state_dict()
    calls = []

    def fake_download(repo_id, filename, local_dir, **kwargs):
        calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        _save(state, path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(weights_store, "unreachable", lambda endpoint=None: None)   # the fake hub is up
    out = ex.extract_lines("lineart_keras", _line_image(32), 32, models_dir=tmp_path / "models")
    assert calls == [("tellurion/line_extractor", "model.pth")]
    assert out.shape == (1, 3, 32, 32)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sketchKeras.pth"]

    def failing_download(**kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(MissingWeights, match="no route to host"):
        ex.extract_lines("lineart", _white(), 32, models_dir=tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sketchKeras.pth"]


def test_safetensors_variant_accepted(tmp_path):
    from safetensors.torch import save_file
    state = _randomise(sketch_keras.build_network()).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sketchKeras.safetensors"))
    out = ex.extract_lines("lineart_keras", _line_image(32), 32, models_dir=tmp_path, allow_download=False)
    assert out.shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------------------- refused files
_MARKER = {}


def _payload(path):
    Path(path).write_text("pwned")
    return {}


class _Evil:
    def __reduce__(self):
        return (_payload, (_MARKER["path"],))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "executed"
    _MARKER["path"] = str(marker)
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"downblock_1.1.weight": torch.zeros(1), "x": _Evil()}, models / "sketchKeras.pth")
    with pytest.raises(CheckpointError) as info:
        ex.extract_lines("lineart_keras", _white(32), 32, models_dir=models, allow_download=False)
    assert "refused" in str(info.value) and "sketchKeras.pth" in str(info.value)
    assert not marker.exists()


def test_wrong_architecture_refused(tmp_path):
    state = _randomise(sketch_keras.build_network()).state_dict()
    _save(state, tmp_path / "erika.pth")  # a SketchKeras file where Erika is expected
    with pytest.raises(CheckpointError, match="missing key"):
        ex.extract_lines("lineart_denoise", _white(32), 32, models_dir=tmp_path, allow_download=False)
    bad = dict(state)
    bad["last_conv.weight"] = torch.zeros(1, 64, 5, 5)
    _save(bad, tmp_path / "sketchKeras.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        ex.extract_lines("lineart_keras", _white(32), 32, models_dir=tmp_path, allow_download=False)
    (tmp_path / "netG.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        ex.extract_lines("lineart", _white(32), 32, models_dir=tmp_path, allow_download=False)


def test_offload_moves_network_to_cpu_and_cpu_is_float32(tmp_path):
    state = _randomise(sketch_keras.build_network()).state_dict()
    _save(state, tmp_path / "sketchKeras.pth")
    ex.extract_lines("lineart_keras", _white(32), 32, models_dir=tmp_path, dtype=torch.float16, offload=True)
    net = ex.load_extractor("lineart_keras", models_dir=tmp_path, dtype=torch.float16)
    assert next(net.parameters()).dtype == torch.float32 and next(net.parameters()).device.type == "cpu"
