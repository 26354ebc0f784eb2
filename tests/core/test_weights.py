"""The weights module: one lookup (a folder, or the Hugging Face cache), one offline check, one download with
progress events, the "missing" message, the models-folder order of the command line, and reading only the
tensors asked for. The hub is replaced by fakes that write files the way it does; nothing reaches the network."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from lib_colorize.errors import MissingWeights
from lib_colorize.weights import (WeightFile, ensure_weight_file, find_weight_file, models_root, read_state_dict,
                                  webui_models_folder)
from lib_colorize.weights import store

SPEC = WeightFile(name="test weights", filename="local.pth", folder="ColorizeDiffusion", hf_repo="org/repo",
                  hf_filename="remote.pth", local_names=("local.safetensors", "local.pth"), size_bytes=3000)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A private hub cache and an online machine whose downloads must go through the fake set by the test."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(store, "PROGRESS_INTERVAL", 0.01)
    monkeypatch.setattr(store, "unreachable", lambda endpoint=None: None)   # the fake hub is up

    def no_network(**kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    return cache


def test_folder_lookup_takes_the_accepted_names_in_order(tmp_path, hub):
    assert find_weight_file(SPEC, tmp_path) is None
    (tmp_path / "local.pth").write_bytes(b"pth")
    assert ensure_weight_file(SPEC, tmp_path) == tmp_path / "local.pth"
    (tmp_path / "local.safetensors").write_bytes(b"st")
    assert ensure_weight_file(SPEC, tmp_path) == tmp_path / "local.safetensors"


def test_a_file_in_the_hub_cache_is_used_without_network(hub):
    snapshot = hub / "models--org--repo" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "remote.pth").write_bytes(b"cached")
    (hub / "models--org--repo" / "refs").mkdir()
    (hub / "models--org--repo" / "refs" / "main").write_text("0123abcd")
    assert ensure_weight_file(SPEC, None) == snapshot / "remote.pth"


def _growing_download(calls, sizes):
    """A fake ``hf_hub_download`` that writes its partial file in steps, as the hub does, then renames it."""
    def download(repo_id, filename, local_dir=None, **kwargs):
        calls.append(dict(repo_id=repo_id, filename=filename, local_dir=local_dir, **kwargs))
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"abc.{filename}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            partial.write_bytes(b"x" * size)
            time.sleep(0.15)
        final = Path(local_dir) / filename
        partial.rename(final)
        return str(final)
    return download


def test_download_into_a_folder_reports_progress_and_takes_the_local_name(tmp_path, hub, monkeypatch):
    import huggingface_hub

    calls, events = [], []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _growing_download(calls, [1000, 2000, 3000]))
    folder = tmp_path / "models"
    path = ensure_weight_file(SPEC, folder, progress=events.append, endpoint="https://mirror.example")
    assert path == folder / "local.pth" and path.read_bytes() == b"x" * 3000
    assert sorted(p.name for p in folder.iterdir()) == ["local.pth"], "the staging folder is removed"
    assert calls[0]["repo_id"] == "org/repo" and calls[0]["filename"] == "remote.pth"
    assert calls[0]["endpoint"] == "https://mirror.example"
    assert Path(calls[0]["local_dir"]).is_relative_to(folder)
    assert events[0].done == 0 and not events[0].finished and events[0].total == 3000
    assert {1000, 2000} <= {e.done for e in events[1:-1]}, "the partial file's growth is reported"
    assert events[-1].finished and events[-1].ok and events[-1].done == 3000
    assert [e.fraction for e in events if e.done == 2000][0] == pytest.approx(2 / 3)


def test_download_into_the_hub_cache(hub, monkeypatch):
    import huggingface_hub

    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        path = hub / "models--org--repo" / "snapshots" / "x" / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(b"w")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert ensure_weight_file(SPEC, None).read_bytes() == b"w"
    assert calls == [{}], "no local_dir: the hub's own cache layout"


def test_a_failed_download_says_what_to_put_where_and_leaves_nothing(tmp_path, hub, monkeypatch):
    import huggingface_hub

    events = []

    def broken(**kwargs):
        Path(kwargs["local_dir"], "half.incomplete").write_bytes(b"x" * 10)
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    folder = tmp_path / "models"
    with pytest.raises(MissingWeights) as info:
        ensure_weight_file(SPEC, folder, progress=events.append)
    message = str(info.value)
    assert "test weights" in message and "local.pth" in message and str(folder) in message
    assert "https://huggingface.co/org/repo/resolve/main/remote.pth" in message
    assert "download failed: OSError: connection reset" in message
    assert info.value.reason.startswith("download failed")
    assert events[-1].finished and not events[-1].ok
    assert not any(folder.iterdir())


def test_no_network_fails_at_once_without_the_hubs_retries(tmp_path, monkeypatch):
    """Before the hub's client (which retries for about half a minute) one connection is tried: refused, the
    download fails at once with the reason, and the client is never called."""
    import huggingface_hub

    def client(**kwargs):
        raise AssertionError("the hub's client was called")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", client)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(MissingWeights) as info:
        ensure_weight_file(SPEC, tmp_path / "models", endpoint=f"http://127.0.0.1:{port}")
    assert f"download failed: cannot reach http://127.0.0.1:{port}" in str(info.value)
    assert info.value.reason.startswith("download failed")
    assert not (tmp_path / "models").exists()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    try:
        assert store.unreachable(f"http://127.0.0.1:{listening.getsockname()[1]}") is None
    finally:
        listening.close()


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_offline_never_touches_the_network(tmp_path, hub, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(MissingWeights, match="HF_HUB_OFFLINE is set"):
        ensure_weight_file(SPEC, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(MissingWeights, match="downloads are off"):
        ensure_weight_file(SPEC, tmp_path, allow_download=False)
    with pytest.raises(MissingWeights, match=r"org/repo/remote.pth is not in the Hugging Face cache"):
        ensure_weight_file(SPEC, None, allow_download=False)


def test_models_folder_order(tmp_path):
    package = tmp_path / "webui" / "extensions" / "sd-webui-colorizediffusion" / "lib_colorize"
    package.mkdir(parents=True)
    assert models_root(None, {}, package).path is None           # not in a webui: the Hugging Face cache
    (tmp_path / "webui" / "modules").mkdir()
    (tmp_path / "webui" / "models").mkdir()
    assert webui_models_folder(package) == tmp_path / "webui" / "models"
    assert models_root(None, {}, package).path == tmp_path / "webui" / "models"
    env = {"COLORIZE_MODELS_DIR": str(tmp_path / "env")}
    assert models_root(None, env, package).path == tmp_path / "env"
    chosen = models_root(str(tmp_path / "given"), env, package)
    assert chosen.path == tmp_path / "given" and chosen.folder("Stable-diffusion") == tmp_path / "given" / \
        "Stable-diffusion"
    assert "--models-dir" in chosen.describe() and str(tmp_path / "given") in chosen.describe()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_read_state_dict_reads_only_what_is_kept(tmp_path, suffix):
    tensors = {"visual.a": torch.arange(4.0), "text.b": torch.ones(2, 3), "logit_scale": torch.tensor(1.0)}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in tensors.items()}}, path)
    kept = read_state_dict(path, keep=lambda k: k.startswith("visual."))
    assert list(kept) == ["visual.a"] and torch.equal(kept["visual.a"], tensors["visual.a"])
    assert set(read_state_dict(path)) == set(tensors)
    assert os.path.getsize(path) > 0
