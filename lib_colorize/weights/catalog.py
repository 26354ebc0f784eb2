"""Every file the method downloads: the released checkpoints, the OpenCLIP weights, the line extractors, the
mask extractors of the enhance modes and the XL models' reference encoders.

Names given by users are looked up here and never joined onto paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import InvalidInput
from .files import WeightFile
from .folders import CHECKPOINTS_FOLDER, EXTENSION_FOLDER, ModelsRoot
from .progress import ProgressCallback
from .store import ensure_weight_file, find_weight_file

RELEASED_LICENCE = "CC BY-NC-SA 4.0 (the authors' release)"


def _released(filename: str, repo: str) -> WeightFile:
    return WeightFile(name=f"ColorizeDiffusion checkpoint {filename[:-len('.safetensors')]}", filename=filename,
                      folder=CHECKPOINTS_FOLDER, hf_repo=repo, hf_filename=filename, licence=RELEASED_LICENCE)


#: Released checkpoint files (method §1.3), by file name.
RELEASED_CHECKPOINTS: dict[str, WeightFile] = {spec.filename: spec for spec in (
    _released("mult-ft.safetensors", "tellurion/colorizer"),
    _released("mult-newft.safetensors", "tellurion/colorizer"),
    _released("mult-eps-ft.safetensors", "tellurion/ColorizeDiffusion"),
    _released("mult-eps-newft.safetensors", "tellurion/ColorizeDiffusion"),
    _released("switch-eps.safetensors", "tellurion/ColorizeDiffusion"),
    _released("v2-full.safetensors", "tellurion/ColorizeDiffusion"),
)}

#: The reference encoder of every released checkpoint (method §1.5): OpenCLIP ViT-H/14, laion2b_s32b_b79k.
CLIP_VIT_H = WeightFile(
    name="OpenCLIP ViT-H-14 weights (laion2b_s32b_b79k)", filename="open_clip_pytorch_model.bin",
    folder=EXTENSION_FOLDER, hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    hf_filename="open_clip_pytorch_model.bin",
    # safetensors first: it is read tower by tower and cannot hold code
    local_names=("open_clip_pytorch_model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    size_bytes=3_940_000_000, licence="MIT (LAION)")
_NO_WEIGHTS_HINT = "Or choose the line extractor 'lineart_standard', which needs no weights."


def _line_extractor(name: str, filename: str, repo: str, hub_name: str) -> WeightFile:
    return WeightFile(name=f"line extractor '{name}'", filename=filename, folder=EXTENSION_FOLDER, hf_repo=repo,
                      hf_filename=hub_name, local_names=(filename, Path(filename).stem + ".safetensors"),
                      hint=_NO_WEIGHTS_HINT)


#: Weights of the learned line extractors (method §8.2), by extractor name: the Hugging Face sources the original
#: app (and the webui's ControlNet, for netG/erika) downloads from; a ``.safetensors`` with the same stem is
#: accepted too.
LINE_EXTRACTOR_FILES: dict[str, WeightFile] = {
    "lineart": _line_extractor("lineart", "netG.pth", "lllyasviel/Annotators", "netG.pth"),
    "lineart_denoise": _line_extractor("lineart_denoise", "erika.pth", "lllyasviel/Annotators", "erika.pth"),
    "lineart_keras": _line_extractor("lineart_keras", "sketchKeras.pth", "tellurion/line_extractor", "model.pth"),
}

def _mask_extractor(name: str, filename: str, licence: str) -> WeightFile:
    return WeightFile(name=f"mask extractor '{name}'", filename=filename, folder=EXTENSION_FOLDER,
                      hf_repo="tellurion/line_extractor", hf_filename=filename, licence=licence)


#: Weights of the enhance modes' mask extractors (method-enhance §4.6), by extractor name. RMBG-2.0 is not here:
#: it is gated and non-commercial, and runs only from a folder the user downloaded (lib_colorize.masks).
MASK_EXTRACTOR_FILES: dict[str, WeightFile] = {
    "ISNet-sketch": _mask_extractor("ISNet-sketch", "sketch-segment.safetensors",
                                    "not stated on the Hub page (the ColorizeDiffusion author's model)"),
    "ISNet": _mask_extractor("ISNet", "isnetis.safetensors", "Apache-2.0 (SkyTNT/anime-segmentation, isnetis)"),
}
#: The XL models' reference encoders (method-xl §1.4, §3.1-3.3): the XL checkpoints carry neither; the original
#: downloads them from their own repositories. CLIP ViT-bigG-14 (laion2b_s39b_b160k): the hub file is the whole
#: open_clip model (about 10.2 GB), of which only the image tower's tensors are read; a transformers
#: ``CLIPVisionModelWithProjection`` file of the same weights is accepted too (method-xl §3.2).
CLIP_BIGG = WeightFile(
    name="CLIP ViT-bigG-14 image tower (laion2b_s39b_b160k)", filename="open_clip_ViT-bigG-14.safetensors",
    folder=EXTENSION_FOLDER, hf_repo="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    hf_filename="open_clip_model.safetensors",
    local_names=("open_clip_ViT-bigG-14.safetensors", "clip_vision_ViT-bigG-14.safetensors",
                 "open_clip_ViT-bigG-14.bin"),
    size_bytes=10_200_000_000, licence="MIT (LAION)")
#: The WD-v1.4 SwinV2 tagger (method-xl §3.3), saved under the original's cache name.
WD_TAGGER = WeightFile(
    name="WD-v1.4 SwinV2 tagger", filename="wd-v14-swin2-tagger.safetensors", folder=EXTENSION_FOLDER,
    hf_repo="SmilingWolf/wd-v1-4-swinv2-tagger-v2", hf_filename="model.safetensors",
    local_names=("wd-v14-swin2-tagger.safetensors", "wd-v1-4-swinv2-tagger-v2.safetensors"),
    size_bytes=385_000_000, licence="Apache-2.0 (SmilingWolf)")
XL_WEIGHT_FILES: dict[str, WeightFile] = {"clip_bigg": CLIP_BIGG, "wd_tagger": WD_TAGGER}

DEFAULT_CLIP_ARCH = "ViT-H-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s32b_b79k"


def clip_weight_file(arch: str = DEFAULT_CLIP_ARCH, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED) -> WeightFile:
    """The weight file an OpenCLIP architecture needs.

    ViT-H-14 with its released tag is :data:`CLIP_VIT_H`. Any other architecture gets its own local names
    (``open_clip_<arch>.safetensors`` / ``.bin``) so that it never picks up the ViT-H file, and a download
    source when open_clip's registry knows one for ``pretrained`` (else, for another arch, its first tag that is
    on the hub).
    """
    if arch == DEFAULT_CLIP_ARCH and pretrained == DEFAULT_CLIP_PRETRAINED:
        return CLIP_VIT_H
    repo, hub_name, tag = None, None, pretrained
    try:
        import open_clip

        tags = [pretrained] if pretrained in open_clip.list_pretrained_tags_by_model(arch) else \
            open_clip.list_pretrained_tags_by_model(arch)
        for candidate in tags:
            hub = (open_clip.get_pretrained_cfg(arch, candidate) or {}).get("hf_hub", "").strip("/")
            if hub:
                parts = hub.split("/")
                repo, hub_name, tag = "/".join(parts[:2]), parts[2] if len(parts) > 2 else CLIP_VIT_H.hf_filename, \
                    candidate
                break
    except Exception:  # an unknown arch has no source; the caller reports the arch itself
        pass
    stem = f"open_clip_{arch}"
    return WeightFile(name=f"OpenCLIP {arch} weights" + (f" ({tag})" if repo else ""),
                      filename=f"{stem}.bin" if repo else f"{stem}.safetensors", folder=EXTENSION_FOLDER,
                      hf_repo=repo, hf_filename=hub_name, local_names=(f"{stem}.safetensors", f"{stem}.bin"),
                      hint="Or give the file with --clip-weights (clip_weights).")


def released_checkpoint(name: str) -> Optional[WeightFile]:
    """The released checkpoint called ``name`` (with or without ``.safetensors``), else None."""
    base = os.path.basename(str(name))
    return RELEASED_CHECKPOINTS.get(base if base.endswith(".safetensors") else base + ".safetensors")


def resolve_checkpoint(name_or_path: "str | os.PathLike[str]", root: ModelsRoot, *, allow_download: bool = True,
                       progress: Optional[ProgressCallback] = None, endpoint: Optional[str] = None) -> Path:
    """A checkpoint path: an existing file as given, else a released name found in (or downloaded into)
    ``<root>/Stable-diffusion`` or the Hugging Face cache."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    spec = released_checkpoint(os.fspath(name_or_path))
    if spec is None:
        names = ", ".join(n[:-len(".safetensors")] for n in RELEASED_CHECKPOINTS)
        raise InvalidInput("checkpoint", f"{os.fspath(name_or_path)} is neither a file nor a released checkpoint "
                                         f"name ({names})")
    return ensure_weight_file(spec, root.folder(spec.folder), allow_download=allow_download, progress=progress,
                              endpoint=endpoint)


def find_checkpoint(name_or_path: "str | os.PathLike[str]", root: ModelsRoot) -> Optional[Path]:
    """Like :func:`resolve_checkpoint` without any download: the file if it is already there, else None."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    spec = released_checkpoint(os.fspath(name_or_path))
    return None if spec is None else find_weight_file(spec, root.folder(spec.folder))


__all__ = ["RELEASED_CHECKPOINTS", "LINE_EXTRACTOR_FILES", "MASK_EXTRACTOR_FILES", "CLIP_BIGG", "WD_TAGGER",
           "XL_WEIGHT_FILES", "RELEASED_LICENCE", "CLIP_VIT_H", "DEFAULT_CLIP_ARCH",
           "DEFAULT_CLIP_PRETRAINED",
           "clip_weight_file", "released_checkpoint", "resolve_checkpoint", "find_checkpoint"]
