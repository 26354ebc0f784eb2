"""The external weight files of the XL models, in one place (method-xl §1.4, §3.1-3.3).

The XL checkpoints carry neither reference encoder: the original downloads CLIP ViT-bigG-14 and the WD-v1.4 SwinV2
tagger from their own repositories. They live in the extension's models folder (``models/ColorizeDiffusion``,
beside the OpenCLIP ViT-H weights of the SD2.1 models) under their own names, or are downloaded there.

Each file is a :class:`WeightFile` record (name, local name, folder, Hugging Face source, size, licence) with the
fields of the project's weight catalog, so these entries join it unchanged.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import MissingWeights

logger = logging.getLogger(__name__)

HF_ENDPOINT = "https://huggingface.co"
#: the sub-folder of the models folder that holds the extension's own weights
EXTENSION_FOLDER = "ColorizeDiffusion"


@dataclass(frozen=True)
class WeightFile:
    """One weight file: what it is, its local name(s), its folder, and its Hugging Face source."""

    name: str
    filename: str
    folder: str
    hf_repo: Optional[str] = None
    hf_filename: Optional[str] = None
    local_names: tuple[str, ...] = ()
    size_bytes: Optional[int] = None
    licence: str = ""
    hint: str = ""

    @property
    def accepted_names(self) -> tuple[str, ...]:
        names = tuple(self.local_names)
        return names if self.filename in names else names + (self.filename,)

    def url(self, endpoint: Optional[str] = None) -> Optional[str]:
        if not (self.hf_repo and self.hf_filename):
            return None
        return f"{(endpoint or HF_ENDPOINT).rstrip('/')}/{self.hf_repo}/resolve/main/{self.hf_filename}"


#: CLIP ViT-bigG-14 (laion2b_s39b_b160k), the XL reference encoder's image tower (method-xl §3.1-3.2). The hub
#: file is the whole open_clip model (image and text towers, about 10.2 GB); only the image tower's tensors are read.
#: A transformers ``CLIPVisionModelWithProjection`` file of the same weights is accepted too (method-xl §3.2).
CLIP_BIGG = WeightFile(
    name="CLIP ViT-bigG-14 image tower (laion2b_s39b_b160k)", filename="open_clip_ViT-bigG-14.safetensors",
    folder=EXTENSION_FOLDER, hf_repo="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    hf_filename="open_clip_model.safetensors",
    local_names=("open_clip_ViT-bigG-14.safetensors", "clip_vision_ViT-bigG-14.safetensors", "open_clip_ViT-bigG-14.bin"),
    size_bytes=10_200_000_000, licence="MIT (LAION)")

#: The WD-v1.4 SwinV2 tagger (method-xl §3.3), saved under the original's cache name.
WD_TAGGER = WeightFile(
    name="WD-v1.4 SwinV2 tagger", filename="wd-v14-swin2-tagger.safetensors", folder=EXTENSION_FOLDER,
    hf_repo="SmilingWolf/wd-v1-4-swinv2-tagger-v2", hf_filename="model.safetensors",
    local_names=("wd-v14-swin2-tagger.safetensors", "wd-v1-4-swinv2-tagger-v2.safetensors"),
    size_bytes=385_000_000, licence="Apache-2.0 (SmilingWolf)")

XL_WEIGHT_FILES = {"clip_bigg": CLIP_BIGG, "wd_tagger": WD_TAGGER}

#: ``download(url, folder, filename) -> path``: a host's downloader (the webui's shows in its progress bar).
Downloader = Callable[[str, str, str], str]


def downloads_disabled() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_weight_file(spec: WeightFile, folder: "str | os.PathLike[str]") -> Optional[str]:
    """The first of ``spec``'s accepted names present in ``folder``, or None."""
    for name in spec.accepted_names:
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            return path
    return None


def missing_message(spec: WeightFile, folder: "str | os.PathLike[str]", reason: str,
                    endpoint: Optional[str] = None) -> str:
    size = f", about {spec.size_bytes / 1e9:.1f} GB" if spec.size_bytes else ""
    source = spec.url(endpoint or os.environ.get("HF_ENDPOINT"))
    where = f" (download {source}{size} and save it under that name)" if source else ""
    return (f"ColorizeDiffusion: the {spec.name} weights are missing ({reason}). Put '{spec.filename}'{where} "
            f"into {os.path.abspath(os.fspath(folder))}.{(' ' + spec.hint) if spec.hint else ''}")


def _hub_download(url: str, folder: str, filename: str, spec: WeightFile) -> str:
    import huggingface_hub

    staging = tempfile.mkdtemp(prefix=".download-", dir=folder)
    try:
        fetched = huggingface_hub.hf_hub_download(spec.hf_repo, spec.hf_filename, local_dir=staging)
        target = os.path.join(folder, filename)
        os.replace(fetched, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_weight_file(spec: WeightFile, folder: "str | os.PathLike[str]", *, allow_download: bool = True,
                       endpoint: Optional[str] = None, download: Optional[Downloader] = None) -> str:
    """The local file of ``spec`` in ``folder``, downloaded there (as ``spec.filename``) when missing and allowed.

    :class:`MissingWeights` names the file, the folder and the source when it is missing and downloads are off
    (``allow_download=False`` or ``HF_HUB_OFFLINE``) or the download failed.
    """
    folder = os.fspath(folder)
    found = find_weight_file(spec, folder)
    if found:
        return found
    if not allow_download or downloads_disabled():
        raise MissingWeights(missing_message(spec, folder, "downloads are off", endpoint))
    url = spec.url(endpoint)
    if url is None:
        raise MissingWeights(missing_message(spec, folder, "it has no download source", endpoint))
    try:
        os.makedirs(folder, exist_ok=True)
        logger.info("ColorizeDiffusion: downloading %s from %s into %s", spec.filename, url, folder)
        if download is not None:
            return download(url, folder, spec.filename)
        return _hub_download(url, folder, spec.filename, spec)
    except Exception as error:  # network, HTTP, disk: the user's fix is the same
        raise MissingWeights(missing_message(spec, folder, f"download failed: {type(error).__name__}: {error}",
                                             endpoint)) from None


__all__ = ["WeightFile", "CLIP_BIGG", "WD_TAGGER", "XL_WEIGHT_FILES", "EXTENSION_FOLDER", "Downloader",
           "downloads_disabled", "find_weight_file", "missing_message", "ensure_weight_file"]
