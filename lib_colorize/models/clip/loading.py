"""Loading the OpenCLIP towers (method §1.5): find or fetch the weight file, then build only the towers asked for
and fill them straight from the file.

A tower is built with open_clip's own tower builder on the meta device, so building costs no memory and no random
initialisation, and its tensors are then assigned from the file (``load_state_dict(assign=True)``, torch >= 2.1)
instead of being copied into freshly initialised ones. Only the tensors of the requested towers are read: a
``.safetensors`` file tensor by tensor, a ``.bin`` memory-mapped (see :func:`lib_colorize.weights.read_state_dict`).
Loading the ViT-H image tower therefore holds about its own 2.5 GB, not the whole 3.9 GB model twice over.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from ...errors import CheckpointError, InvalidInput, MissingWeights
from ...module_info import parameter_bytes
from ...weights import (CLIP_VIT_H, DEFAULT_CLIP_ARCH, DEFAULT_CLIP_PRETRAINED, ProgressCallback, clip_weight_file,
                        ensure_weight_file, read_state_dict)
from .image_tower import ReferenceEncoder
from .text_tower import TextEncoder

logger = logging.getLogger(__name__)

DEFAULT_ARCH = DEFAULT_CLIP_ARCH
DEFAULT_PRETRAINED = DEFAULT_CLIP_PRETRAINED
# Where the ViT-H/14 weights of method §1.5 come from, and the names accepted in a models folder.
HF_REPO_VIT_H = CLIP_VIT_H.hf_repo
HF_FILENAME = CLIP_VIT_H.hf_filename
LOCAL_WEIGHT_NAMES = CLIP_VIT_H.accepted_names
TOWERS = ("visual", "text")
_NOT_TEXT = ("logit_scale", "logit_bias")


def known_architectures() -> list[str]:
    """open_clip's architecture names (its bundled configs and any registered with ``add_model_config``)."""
    import open_clip

    return list(open_clip.list_models())


def model_config(arch: str) -> dict:
    """open_clip's config of ``arch``; :class:`InvalidInput` (field ``clip_arch``) listing the known ones."""
    import open_clip

    config = open_clip.get_model_config(arch)
    if not config or "vision_cfg" not in config or "text_cfg" not in config:
        raise InvalidInput("clip_arch", f"unknown open_clip architecture {arch!r}; known: "
                                        f"{', '.join(known_architectures())} (or an open_clip model-config .json file)")
    return config


def output_width(arch: str) -> int:
    """Width D of the tokens ``arch`` produces (its ``embed_dim``): what a checkpoint's context width must equal."""
    return int(model_config(arch)["embed_dim"])


def build_tower(arch: str, tower: str) -> nn.Module:
    """open_clip's vision tower (``tower='visual'``) or text tower of ``arch`` on the meta device: the module
    structure with no storage and no initialisation, ready for ``load_state_dict(assign=True)``."""
    from open_clip import model as open_clip_model

    config = model_config(arch)
    quick_gelu = bool(config.get("quick_gelu", False))
    with torch.device("meta"):
        if tower == "visual":
            return open_clip_model._build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu)
        return open_clip_model._build_text_tower(config["embed_dim"], config["text_cfg"], quick_gelu)


def resolve_clip_weights(
    arch: str = DEFAULT_ARCH,
    weights: Optional[str] = None,
    pretrained: Optional[str] = DEFAULT_PRETRAINED,
    models_dir: Optional[str] = None,
    allow_download: bool = True,
    progress: Optional[ProgressCallback] = None,
    endpoint: Optional[str] = None,
) -> str:
    """Path of the open_clip weights: explicit ``weights`` > the file ``arch`` needs
    (:func:`lib_colorize.weights.clip_weight_file`) in ``models_dir`` (None: the Hugging Face cache) > its
    download there.

    Raises :class:`MissingWeights` naming the file, the folder and the source when nothing is usable (explicit
    file absent; downloads off: ``allow_download=False`` or HF_HUB_OFFLINE; or the download failed).
    """
    if weights:
        if not os.path.isfile(weights):
            raise MissingWeights(f"ColorizeDiffusion: OpenCLIP weights file {os.fspath(weights)} does not exist.")
        return os.fspath(weights)
    return os.fspath(ensure_weight_file(clip_weight_file(arch, pretrained), models_dir, allow_download=allow_download,
                                        progress=progress, endpoint=endpoint))


def _wanted(towers: Tuple[str, ...]) -> Callable[[str], bool]:
    def keep(key: str) -> bool:
        if key.startswith("visual."):
            return "visual" in towers
        return "text" in towers and key not in _NOT_TEXT
    return keep


def split_state_dict(sd: Mapping[str, torch.Tensor]) -> Tuple[dict, dict]:
    """(visual part with 'visual.' stripped, text part) of a CLIP (or CustomTextCLIP 'text.') state dict."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if any(k.startswith("text.") for k in sd):
        text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    else:
        text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in _NOT_TEXT}
    return visual, text


def _load_part(module: nn.Module, part: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Strict load of one tower by assignment; a mismatch is a CheckpointError naming a few keys/shapes."""
    if not part:
        raise CheckpointError(path, f"no {what} weights in this file; is it an OpenCLIP checkpoint?")
    own = module.state_dict()
    missing = sorted(set(own) - set(part))
    unexpected = sorted(k for k in part if k not in own and k != "attn_mask")
    wrong = sorted(k for k in own if k in part and tuple(part[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        details = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for label, keys in groups if keys]
        raise CheckpointError(path, f"{what} weights do not match the architecture ({'; '.join(details)})")
    module.load_state_dict({k: part[k] for k in own}, strict=True, assign=True)
    left = [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers()) if tensor.is_meta]
    if left:  # a tensor the file does not carry (a non-persistent buffer): nothing to compute it from
        raise CheckpointError(path, f"{what}: open_clip builds tensors that the file does not hold: {', '.join(left)}")


@dataclass
class ClipEncoders:
    """What :func:`load_clip` returns: the requested towers (None when not requested) and the weights used."""

    reference: Optional[ReferenceEncoder]
    text: Optional[TextEncoder]
    weights_path: str
    arch: str

    def parameter_bytes(self) -> dict:
        """Resident bytes of each loaded tower's tensors: ``{"visual": n, "text": m}`` (0 for a tower not loaded)."""
        return {"visual": parameter_bytes(self.reference) if self.reference is not None else 0,
                "text": parameter_bytes(self.text) if self.text is not None else 0}


def load_clip(
    arch: str = DEFAULT_ARCH,
    weights: Optional[str] = None,
    pretrained: Optional[str] = DEFAULT_PRETRAINED,
    models_dir: Optional[str] = None,
    allow_download: bool = True,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    towers: Iterable[str] = TOWERS,
    progress: Optional[ProgressCallback] = None,
    endpoint: Optional[str] = None,
) -> ClipEncoders:
    """The requested towers of ``arch``, filled from the weights of :func:`resolve_clip_weights`: frozen, in eval
    mode, on ``device``/``dtype``.

    ``towers``: non-empty subset of ('visual', 'text'); only those are built and only their tensors are read.
    """
    towers = tuple(towers)
    if set(towers) - set(TOWERS) or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {towers}")
    model_config(arch)  # an unknown architecture is reported before any file is looked for
    path = resolve_clip_weights(arch, weights, pretrained, models_dir, allow_download, progress, endpoint)
    names = " and ".join({"visual": "image tower", "text": "text tower"}[t] for t in towers)
    logger.info("loading OpenCLIP %s (%s) from %s", arch, names, path)
    started = time.monotonic()
    visual_sd, text_sd = split_state_dict(read_state_dict(path, keep=_wanted(towers)))
    reference = text = None
    if "visual" in towers:
        reference = ReferenceEncoder(build_tower(arch, "visual"))
        _load_part(reference.visual, visual_sd, path, "image tower")
    if "text" in towers:
        text = TextEncoder(build_tower(arch, "text"))
        _load_part(text, text_sd, path, "text tower")
    del visual_sd, text_sd
    for encoder in (reference, text):
        if encoder is not None:
            encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("loaded OpenCLIP %s in %.1f s", arch, time.monotonic() - started)
    return ClipEncoders(reference=reference, text=text, weights_path=path, arch=arch)


__all__ = ["DEFAULT_ARCH", "DEFAULT_PRETRAINED", "HF_REPO_VIT_H", "HF_FILENAME", "LOCAL_WEIGHT_NAMES", "TOWERS",
           "known_architectures", "model_config", "output_width", "build_tower", "resolve_clip_weights",
           "split_state_dict", "ClipEncoders", "load_clip"]
