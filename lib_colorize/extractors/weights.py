"""Locating, downloading and safely loading the line extractors' weight files (method §8.2).

Files live directly in ``models_dir`` under ``spec.weight_file`` (a ``.safetensors`` file with the same stem is
accepted too). When absent they are downloaded from the Hugging Face Hub (``spec.hf_repo`` / ``spec.hf_filename``)
with ``huggingface_hub.hf_hub_download``, unless downloads are disallowed or the hub is offline (``HF_HUB_OFFLINE``);
then :class:`~lib_colorize.errors.MissingWeights` says which file to put where and where to get it.

``.pth`` files are read only with ``torch.load(weights_only=True)``: a file that needs arbitrary Python objects is
refused (:class:`~lib_colorize.errors.CheckpointError`), it is never unpickled unsafely.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from lib_colorize.errors import CheckpointError, MissingWeights

if TYPE_CHECKING:  # pragma: no cover
    from . import ExtractorSpec

#: <repository root>/models/ColorizeDiffusion; the webui adapter passes the webui's own models folder instead.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models" / "ColorizeDiffusion"

_DOWNLOAD_SUBDIR = ".download-tmp"
_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm counters: unused in eval, absent from some files


def resolve_models_dir(models_dir: "str | os.PathLike[str] | None") -> Path:
    return Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def find_weights(spec: "ExtractorSpec", models_dir: "str | os.PathLike[str] | None" = None) -> Path | None:
    """The existing weight file of ``spec`` in ``models_dir`` (default :data:`DEFAULT_MODELS_DIR`), else None."""
    if not spec.needs_weights:
        return None
    folder = resolve_models_dir(models_dir)
    primary = folder / spec.weight_file
    candidates = (primary, primary.with_suffix(".safetensors"))
    for path in candidates:
        if path.is_file():
            return path
    return None


def _missing(spec: "ExtractorSpec", folder: Path, reason: str) -> MissingWeights:
    kind = getattr(spec, "kind", "line extractor")   # mask-extractor specs (lib_colorize.masks) say what they are
    alternative = (", or choose the line extractor 'lineart_standard', which needs no weights"
                   if kind == "line extractor" else "")
    return MissingWeights(
        f"ColorizeDiffusion: {kind} '{spec.name}' needs the weight file {spec.weight_file} in {folder}, "
        f"which is missing ({reason}). Download {spec.source_url} and save it as {folder / spec.weight_file}"
        f"{alternative}.")


def ensure_weights(spec: "ExtractorSpec", models_dir: "str | os.PathLike[str] | None" = None, *,
                   allow_download: bool = True) -> Path:
    """Path of the weight file, downloading it into ``models_dir`` if needed and allowed; else MissingWeights."""
    folder = resolve_models_dir(models_dir)
    found = find_weights(spec, folder)
    if found is not None:
        return found
    if not allow_download:
        raise _missing(spec, folder, "automatic download is disabled")
    if hub_offline():
        raise _missing(spec, folder, "HF_HUB_OFFLINE is set, so it was not downloaded")
    return _download(spec, folder)


def _download(spec: "ExtractorSpec", folder: Path) -> Path:
    """Download into a private sub-folder, then move to ``folder / spec.weight_file`` (never overwrites)."""
    staging = folder / _DOWNLOAD_SUBDIR / spec.name
    target = folder / spec.weight_file
    try:
        from huggingface_hub import hf_hub_download

        staging.mkdir(parents=True, exist_ok=True)
        print(f"ColorizeDiffusion: downloading {spec.source_url} to {target}")
        downloaded = hf_hub_download(repo_id=spec.hf_repo, filename=spec.hf_filename, local_dir=str(staging))
        os.replace(downloaded, target)
    except Exception as error:  # network, disk, hub errors: the user can still place the file by hand
        raise _missing(spec, folder, f"download failed: {type(error).__name__}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (folder / _DOWNLOAD_SUBDIR).rmdir()
        except OSError:
            pass
    return target


def load_state_dict(path: "str | os.PathLike[str]") -> dict[str, torch.Tensor]:
    """Tensors of a weight file on CPU: ``.safetensors``, or ``.pth`` through ``torch.load(weights_only=True)``.

    A ``{"state_dict": {...}}`` wrapper is unwrapped and a DataParallel ``module.`` prefix is removed.
    Raises CheckpointError for unreadable files and for pickles that need more than tensors and containers.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch 2.1 warns about TypedStorage while loading old files
                warnings.simplefilter("ignore", UserWarning)
                data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(path, "refused: the file holds Python objects other than tensors, which could run "
                                    "code when loaded (only weights_only loading is allowed). Re-download it "
                                    f"from the original source. Detail: {str(error).splitlines()[0]}") from error
    except Exception as error:
        raise CheckpointError(path, f"cannot be read as a weight file ({type(error).__name__}: {error})") from error
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is not a named tensor")
        tensors[key[len("module."):] if key.startswith("module.") else key] = value
    return tensors


def load_into(net: nn.Module, path: "str | os.PathLike[str]") -> nn.Module:
    """Load ``path`` into ``net`` after checking that keys and shapes match exactly (BatchNorm counters aside)."""
    state = load_state_dict(path)
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith(_IGNORED_SUFFIXES)}
    given = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:3])}{more}")
        raise CheckpointError(path, f"does not match the {type(net).__name__} architecture: " + "; ".join(parts))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in given.items()}, strict=False)
    return net
