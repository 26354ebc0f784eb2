"""Checkpoint inspection and loading (method §1.3, §1.4, §11): version and parameterization detection, refusal of
foreign, truncated, corrupt, mis-shaped and code-executing files."""
from __future__ import annotations

import os

import pytest
import torch

from lib_colorize import checkpoint as ckpt
from lib_colorize.checkpoint import (
    CheckpointInfo, LoadedCheckpoint, inspect_checkpoint, is_colorize_checkpoint, load_checkpoint, read_tensors,
)
from lib_colorize.errors import CheckpointError, ColorizeError
from lib_colorize.models import AutoencoderKL, SketchEncoder, UNetModel
from lib_colorize.testing.checkpoints import make_checkpoint, make_sd_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {v: make_checkpoint(root / f"{name}.safetensors", version=v)
            for v, name in (("v1", "mult-ft"), ("v1.5", "switch-eps"), ("v2", "v2-full"))}


# (version written, released file name, expected version, expected parameterization) — method §1.3, §11
CASES = [
    ("v1", "mult-ft", "v1", "eps"),
    ("v1", "mult-newft", "v1", "eps"),
    ("v1", "mult-eps-ft", "v1", "eps"),
    ("v1", "mult-eps-newft", "v1", "eps"),
    ("v1.5", "switch-eps", "v1.5", "eps"),
    ("v2", "v2-full", "v2", "v"),
]


@pytest.mark.parametrize("written, name, version, parameterization", CASES)
def test_version_and_parameterization(tmp_path, files, written, name, version, parameterization):
    path = tmp_path / f"{name}.safetensors"
    os.link(files[written], path)
    info = inspect_checkpoint(path)
    assert isinstance(info, CheckpointInfo)
    assert (info.version, info.parameterization) == (version, parameterization)
    assert info.unet_keys_present and info.has_sketch_encoder and info.has_vae
    assert info.name_version == version and info.warnings == ()
    assert info.dtypes == {"unet": ("F32",), "vae": ("F16",), "sketch_encoder": ("F32",)}  # fp16 VAE (§1.3)
    assert info.path == str(path)


@pytest.mark.parametrize("version", ["v1", "v1.5", "v2"])
def test_each_version_loads_and_runs(files, version):
    loaded = load_checkpoint(files[version])
    assert isinstance(loaded, LoadedCheckpoint) and loaded.info.version == version
    assert isinstance(loaded.unet, UNetModel) and isinstance(loaded.vae, AutoencoderKL)
    assert isinstance(loaded.sketch_encoder, SketchEncoder)
    assert loaded.vae.dtype == torch.float32  # cast from the stored fp16
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.ignored_keys >= 12  # schedule buffers (+ the version's extra modules)
    with torch.no_grad():
        hints = loaded.sketch_encoder(torch.zeros(1, 3, 64, 64))
        out = loaded.unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 64))
    assert len(hints) == 5 and out.shape == (1, 4, 8, 8)


def test_loaded_values_equal_file_values(files):
    path = files["v1.5"]
    loaded = load_checkpoint(path, dtype=torch.float64)
    stored = read_tensors(path, "model.diffusion_model.")
    key = "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    assert key.replace(".weight", ".lora_down_fg.weight") in stored  # v1.5 LoRA present in the file, ignored
    assert torch.equal(loaded.unet.state_dict()[key], stored[key].double())
    vae_key = "decoder.up.1.upsample.conv.weight"
    assert torch.equal(loaded.vae.state_dict()[vae_key], read_tensors(path, "first_stage_model.")[vae_key].double())
    assert loaded.unet.dtype == torch.float64


def test_dtype_and_components(files, monkeypatch):
    read = []
    original = ckpt._TensorSource.get
    monkeypatch.setattr(ckpt._TensorSource, "get", lambda self, key: read.append(key) or original(self, key))
    loaded = load_checkpoint(files["v2"], dtype=torch.bfloat16, components=("sketch_encoder",))
    assert loaded.unet is None and loaded.vae is None
    assert loaded.sketch_encoder.dtype == torch.bfloat16
    assert read and all(k.startswith("control_encoder.") for k in read)  # only the needed tensors are read
    with pytest.raises(ValueError):
        load_checkpoint(files["v1"], components=("clip",))


def test_is_colorize_checkpoint():
    assert is_colorize_checkpoint(["model.diffusion_model.out.2.weight", "control_encoder.model.0.weight"])
    assert not is_colorize_checkpoint(["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"])
    assert not is_colorize_checkpoint([])


@pytest.mark.parametrize("sd_version", ["sd1", "sd2"])
def test_plain_sd_checkpoint_is_refused(tmp_path, sd_version):
    path = make_sd_checkpoint(tmp_path / f"{sd_version}-base.safetensors", sd_version=sd_version)
    for call in (inspect_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            call(path)
        message = str(err.value)
        assert path in message and "plain Stable Diffusion checkpoint" in message
        assert "not a ColorizeDiffusion checkpoint" in message
        assert isinstance(err.value, ColorizeError) and err.value.path == path


def test_file_without_unet_or_sketch_encoder_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down.weight": torch.ones(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a ColorizeDiffusion checkpoint") as err:
        inspect_checkpoint(path)
    assert path in str(err.value)


@pytest.mark.parametrize("keep", ["half", "minus_one", "header_only", "four_bytes"])
def test_truncated_file_is_refused(tmp_path, files, keep):
    data = open(files["v1"], "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"half": len(data) // 2, "minus_one": len(data) - 1, "header_only": header_end, "four_bytes": 4}[keep]
    path = str(tmp_path / "mult-ft.safetensors")
    with open(path, "wb") as f:
        f.write(data[:cut])
    for call in (inspect_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            call(path)
        assert path in str(err.value) and "truncated" in str(err.value)


def test_corrupt_header_and_missing_file(tmp_path):
    path = str(tmp_path / "mult-ft.safetensors")
    with open(path, "wb") as f:
        f.write((40).to_bytes(8, "little") + b"{not json at all" + b" " * 24 + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt") as err:
        inspect_checkpoint(path)
    assert path in str(err.value)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found") as err:
        load_checkpoint(missing)
    assert missing in str(err.value)


def test_wrong_shape_tensor_is_named(tmp_path):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    path = make_checkpoint(tmp_path / "mult-ft.safetensors", overrides={key: torch.ones(64, 32)})
    assert inspect_checkpoint(path).version == "v1"  # inspection reads no shapes of use; loading checks them
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert key in message and "(64, 32)" in message and "(64, 64)" in message and path in message


def test_wrong_shape_in_sketch_encoder_is_named(tmp_path):
    key = "control_encoder.zero_blocks.1.0.weight"
    path = make_checkpoint(tmp_path / "mult-ft.safetensors", overrides={key: torch.ones(64, 64, 3, 3)})
    load_checkpoint(path, components=("unet",))  # the U-Net alone is fine
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        load_checkpoint(path, components=("sketch_encoder",))
    assert "(64, 64, 3, 3)" in str(err.value) and "(64, 64, 1, 1)" in str(err.value)


def test_missing_key_is_named(tmp_path):
    key = "control_encoder.zero_layer.0.bias"
    path = make_checkpoint(tmp_path / "mult-ft.safetensors", drop=[key])
    with pytest.raises(CheckpointError, match="missing required key") as err:
        load_checkpoint(path)
    assert key in str(err.value)
    path = make_checkpoint(tmp_path / "mult-newft.safetensors", drop=["model.diffusion_model.out.2.weight"])
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.out\.2\.weight"):
        load_checkpoint(path, components=("unet",))


def test_name_and_keys_disagree_keys_win(tmp_path, files):
    path = tmp_path / "v2-renamed.safetensors"
    os.link(files["v1"], path)
    info = inspect_checkpoint(path)
    assert (info.version, info.parameterization, info.name_version) == ("v1", "eps", "v2")
    assert info.warnings and "v2" in info.warnings[0]


def test_linear_proj_checkpoint_loads(tmp_path):
    path = make_checkpoint(tmp_path / "mult-linear.safetensors", linear_proj=True)
    loaded = load_checkpoint(path, components=("unet",))
    assert loaded.unet.config.use_linear_proj
    assert isinstance(loaded.unet.middle_block[1].proj_out, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------------------------------
# Pickle files: weights_only or nothing


def test_weights_only_ckpt_loads(tmp_path, files):
    sd = read_tensors(files["v1"], "")
    path = str(tmp_path / "mult-eps-ft.ckpt")
    torch.save({"state_dict": sd, "global_step": 10}, path)
    loaded = load_checkpoint(path, components=("sketch_encoder", "unet"))
    assert (loaded.info.version, loaded.info.parameterization) == ("v1", "eps")
    key = "model.14.weight"
    assert torch.equal(loaded.sketch_encoder.state_dict()[key], sd["control_encoder." + key])


class _CreatesFile:
    """Unpickling this calls open(target, "w"): arbitrary code at load time."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused(tmp_path, files, zip_format):
    target = tmp_path / "pwned.txt"
    payload = {"state_dict": {"control_encoder.model.0.weight": torch.ones(1), "x": _CreatesFile(str(target))}}
    path = str(tmp_path / "mult-ft.ckpt")
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    for call in (inspect_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            call(path)
        message = str(err.value)
        assert path in message and "arbitrary code" in message and ".safetensors" in message
        assert not target.exists()

    # control: the payload is real — an unrestricted unpickler would have created the file
    torch.load(path, weights_only=False)
    assert target.exists()


def test_corrupt_ckpt_is_refused(tmp_path):
    path = str(tmp_path / "mult-ft.pth")
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        inspect_checkpoint(path)
    assert path in str(err.value)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        inspect_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------------
# Pickle key tables: what a .ckpt is, decided without reading its tensors


def _mixed_state_dict(files) -> dict:
    sd = read_tensors(files["v1"], "")
    sd["model.diffusion_model.input_blocks.0.0.bias"] = sd["model.diffusion_model.input_blocks.0.0.bias"].half()
    sd["control_encoder.model.0.bias"] = sd["control_encoder.model.0.bias"].to(torch.bfloat16)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.nn.Parameter(sd["first_stage_model.encoder.conv_in.weight"])
    return sd


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_key_table_reads_no_tensor_data(tmp_path, files, zip_format, monkeypatch):
    sd = _mixed_state_dict(files)
    path = str(tmp_path / "mult-eps-ft.ckpt")
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 2}, path, _use_new_zipfile_serialization=zip_format)
    expected = {k: ckpt.TensorInfo(ckpt._TORCH_DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in sd.items()}
    reference_info = inspect_checkpoint(files["v1"])

    opened_members = []
    original_open = ckpt.zipfile.ZipFile.open
    def recording_open(self, name, *args, **kwargs):
        opened_members.append(str(name))
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(ckpt.zipfile.ZipFile, "open", recording_open)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called to read a key table")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert ckpt.read_pickle_key_table(path) == expected
    info = inspect_checkpoint(path)
    assert (info.version, info.parameterization, info.num_tensors) == ("v1", "eps", len(sd))
    assert info.dtypes["unet"] == ("F16", "F32") and info.dtypes["sketch_encoder"] == ("BF16", "F32")
    assert info.has_sketch_encoder and info.has_vae and reference_info.num_tensors == info.num_tensors
    if zip_format:
        assert opened_members and all(name.endswith("data.pkl") for name in opened_members)


def test_legacy_pickle_key_table_does_not_need_the_tensor_data(tmp_path, files):
    """The legacy format stores the tensors after the pickle: a file cut right after it still gives its keys."""
    sd = read_tensors(files["v1"], "control_encoder.", strip=False)
    path = tmp_path / "mult-ft.pth"
    torch.save(sd, str(path), _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut = tmp_path / "mult-ft-cut.pth"
    cut.write_bytes(data[: len(data) // 3])
    assert ckpt.read_pickle_key_table(str(cut)) == ckpt.read_pickle_key_table(str(path))
    assert set(ckpt.read_pickle_key_table(str(cut))) == set(sd)


def test_pickle_tensors_are_read_only_when_asked(tmp_path, files):
    sd = read_tensors(files["v1"], "")
    path = str(tmp_path / "mult-eps-ft.ckpt")
    torch.save(sd, path)
    encoder = read_tensors(path, "control_encoder.")
    assert encoder and all(torch.equal(t, sd["control_encoder." + k]) for k, t in encoder.items())
