"""CLIP ViT-bigG-14 image tokens of the XL reference encoder (method-xl §3.1-3.2).

The tower is open_clip's ``VisionTransformer`` (architecture ``ViT-bigG-14``: width 1664, 48 layers, heads of 104,
MLP 8192, exact GELU, patch 14 at 224 px, projection to 1280), built on the meta device and filled from the weight
file; its forward is :class:`lib_colorize.models.clip.ReferenceEncoder`'s (``ln_post`` and the projection on all
257 tokens, independent of open_clip's tensor layout). The original uses transformers'
``CLIPVisionModelWithProjection`` of the same weights: its ``post_layernorm(last_hidden_state)`` projected by
``visual_projection`` is the same computation, so a file in either format is accepted (:func:`hf_to_open_clip`).

Preprocessing differs from the SD2.1 models' (method-xl §3.1, §12 #12): the reference in [-1, 1] is stretched to
224 × 224 by ``F.interpolate(bicubic, align_corners=True, antialias=True)``, mapped to [0, 1] and normalised with
the CLIP mean and std (no aspect preservation, no crop, no kornia blur).
"""
from __future__ import annotations

import copy
import os
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..memory import release_memory
from .clip import ReferenceEncoder, clip_normalize

BIGG_ARCH = "ViT-bigG-14"
BIGG_IMAGE_SIZE = 224


def bigg_config() -> dict:
    """open_clip's model config of ViT-bigG-14 (``embed_dim`` 1280 and its ``vision_cfg``)."""
    import open_clip

    config = open_clip.get_model_config(BIGG_ARCH)
    if not config:
        raise RuntimeError(f"open_clip does not know the architecture {BIGG_ARCH}")
    return copy.deepcopy(config)


def clip_config_for(arch: Optional[str]) -> Optional[dict]:
    """The open_clip config of an image-tower architecture for the XL reference encoder: None (ViT-bigG-14) for
    the default names, else ``arch``'s registered config (e.g. a reduced one for tests)."""
    if arch in (None, "", BIGG_ARCH, "ViT-H-14"):
        return None
    import open_clip

    config = open_clip.get_model_config(arch)
    if not config:
        from ..errors import InvalidInput

        raise InvalidInput("clip_arch", f"unknown open_clip architecture {arch!r}")
    return copy.deepcopy(config)


def build_vision_tower(config: Optional[Mapping] = None) -> nn.Module:
    """open_clip's vision tower for ``config`` (``{"embed_dim", "vision_cfg"}``; default ViT-bigG-14) on the meta
    device: no storage and no initialisation, ready for ``load_state_dict(assign=True)``."""
    from open_clip import model as open_clip_model

    config = bigg_config() if config is None else config
    with torch.device("meta"):
        return open_clip_model._build_vision_tower(int(config["embed_dim"]), dict(config["vision_cfg"]),
                                                   bool(config.get("quick_gelu", False)))


def preprocess_reference_xl(images: torch.Tensor, size: int = BIGG_IMAGE_SIZE) -> torch.Tensor:
    """Reference (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, size, size), float32 (method-xl §3.1)."""
    x = F.interpolate(images.float(), (size, size), mode="bicubic", align_corners=True, antialias=True)
    return clip_normalize(x)


class XLClipEncoder(ReferenceEncoder):
    """ViT-bigG-14 tokens (B, 257, 1280) of a reference in [-1, 1] with the XL preprocessing."""

    @torch.no_grad()
    def encode_full(self, images: torch.Tensor) -> torch.Tensor:
        self._validate(images)
        return self.tokens_from_pixels(preprocess_reference_xl(images, self.image_size))


_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def is_hf_format(keys) -> bool:
    return any(k.startswith("vision_model.") for k in keys)


def hf_to_open_clip(sd: Mapping[str, torch.Tensor]) -> dict:
    """transformers ``CLIPVisionModel(WithProjection)`` tensors -> open_clip ``VisionTransformer`` names.

    Separate ``q/k/v_proj`` become the packed ``attn.in_proj_*`` (q, k, v rows); ``visual_projection.weight`` W
    (out, in) becomes ``proj`` = Wᵀ (open_clip computes x @ proj).
    """
    out: dict = {}
    packed: dict = {}
    for key, tensor in sd.items():
        if key == "visual_projection.weight":
            out["proj"] = tensor.t().contiguous()
            continue
        if key.endswith("position_ids") or not key.startswith("vision_model."):
            continue
        layer = _HF_LAYER.match(key)
        if layer:
            index, rest = layer.groups()
            qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
            if qkv:
                packed.setdefault((index, qkv.group(2)), {})[qkv.group(1)] = tensor
                continue
            for hf_name, oc_name in _HF_LAYER_NAMES.items():
                if rest.startswith(hf_name + "."):
                    out[f"transformer.resblocks.{index}.{oc_name}{rest[len(hf_name):]}"] = tensor
                    break
            else:
                raise CheckpointError("(CLIP)", f"unexpected tensor {key} in a transformers CLIP vision file")
            continue
        short = key[len("vision_model."):]
        names = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
                 "embeddings.position_embedding.weight": "positional_embedding"}
        if short in names:
            out[names[short]] = tensor
        elif short.startswith("pre_layrnorm."):
            out["ln_pre." + short.split(".", 1)[1]] = tensor
        elif short.startswith("post_layernorm."):
            out["ln_post." + short.split(".", 1)[1]] = tensor
        else:
            raise CheckpointError("(CLIP)", f"unexpected tensor {key} in a transformers CLIP vision file")
    for (index, kind), parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError("(CLIP)", f"layer {index} lacks one of its q/k/v projections")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def read_vision_tensors(path: str) -> dict:
    """The image tower's tensors of an open_clip (``visual.*``) or transformers (``vision_model.*``) file, in
    open_clip's names. Only those tensors are read (``.safetensors`` key by key into their own memory; ``.bin``
    memory-mapped)."""
    def wanted(key: str) -> bool:
        return key.startswith(("visual.", "vision_model.")) or key == "visual_projection.weight"

    try:
        if path.endswith(".safetensors"):
            from ..checkpoint import read_tensors

            sd = read_tensors(path, keep=wanted)      # only these tensors, read without a memory map
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
                loaded = loaded["state_dict"]
            sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in loaded.items()}
            sd = {k: v for k, v in sd.items() if wanted(k)}
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(path, f"cannot read the CLIP weights ({type(error).__name__}: {error})") from None
    if not sd:
        raise CheckpointError(path, "no CLIP image-tower tensors (visual.* or vision_model.*) in this file")
    if is_hf_format(sd):
        try:
            return hf_to_open_clip(sd)
        except CheckpointError as error:
            raise CheckpointError(path, error.problem) from None
    return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}


def load_clip_bigg(path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                   config: Optional[Mapping] = None) -> XLClipEncoder:
    """The ViT-bigG-14 image tower (or the architecture of ``config``) from ``path``, frozen, on ``device``."""
    tower = build_vision_tower(config)
    tensors = read_vision_tensors(os.fspath(path))
    own = tower.state_dict()
    missing = sorted(set(own) - set(tensors))
    wrong = sorted(k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:4])}" for label, keys in (("missing", missing),
                                                                                ("wrong shape", wrong)) if keys)
        raise CheckpointError(path, f"the CLIP image-tower weights do not match {BIGG_ARCH} ({detail})")
    # converted one tensor at a time, each stored copy dropped as it goes: the peak stays near one tower
    state = {k: tensors.pop(k).to(dtype) for k in own}
    del tensors
    tower.load_state_dict(state, strict=True, assign=True)
    del state
    release_memory()
    encoder = XLClipEncoder(tower)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
