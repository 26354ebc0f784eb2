"""The WD-v1.4 SwinV2 tagger tokens of the XL reference encoder (method-xl §3.3).

The network is timm's (``swinv2_base_window8_256`` at 448 px, window 14, 9083 classes, GELU; timm ≥ 0.9 stage
layout, which timm 1.x in the webui's environment has), built without pretrained weights and filled from the
tagger's ``model.safetensors``. The tokens are timm's ``forward_features`` (patch embedding, all four stages, the
final norm): (B, 14, 14, 1024), flattened row-major to (B, 196, 1024). The class head is not evaluated (the
original computes per-token logits and discards them).

Preprocessing (method-xl §3.3, §12 #12): the reference in [-1, 1] stretched to 448 × 448 by
``F.interpolate(bicubic, align_corners=True, antialias=True)``, then RGB -> BGR; no other normalisation.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

#: timm's constructor arguments of the released tagger (method-xl §3.3).
WD_TAGGER_ARCH = {"model_name": "swinv2_base_window8_256", "num_classes": 9083, "global_pool": "avg",
                  "act_layer": "gelu", "img_size": 448, "window_size": 14}
WD_IMAGE_SIZE = 448
#: buffers timm computes itself; older or newer timm versions may or may not store them
_DERIVED_BUFFERS = re.compile(r"(relative_coords_table|relative_position_index|attn_mask|k_bias)$")


def build_tagger(arch: Optional[Mapping] = None) -> nn.Module:
    """The timm SwinV2 of ``arch`` (default :data:`WD_TAGGER_ARCH`; a dict of ``SwinTransformerV2`` arguments
    with a ``model_name`` of None builds the class directly, for reduced test widths)."""
    import timm
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    arch = dict(WD_TAGGER_ARCH if arch is None else arch)
    name = arch.pop("model_name", None)
    model = timm.create_model(name, pretrained=False, **arch) if name else SwinTransformerV2(**arch)
    return model.eval().requires_grad_(False)


def tagger_arch_from_shapes(shapes: Mapping[str, "torch.Size | tuple"]) -> dict:
    """The SwinV2 arguments of a tagger file from its tensor shapes (timm names): embedding width, blocks per
    stage, heads per stage (``logit_scale`` is (heads, 1, 1)), classes; 448 px and window 14 as released. The
    released shapes give :data:`WD_TAGGER_ARCH`."""
    import re as _re

    depths, heads = {}, {}
    for key, shape in shapes.items():
        match = _re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.logit_scale$", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            heads[stage] = int(shape[0])
    try:
        embed_dim = int(shapes["patch_embed.proj.weight"][0])
        classes = int(shapes["head.fc.weight"][0])
    except KeyError as error:
        raise ValueError(f"not a SwinV2 tagger file (no {error.args[0]})") from None
    stages = sorted(depths)
    arch = {"model_name": None, "img_size": WD_IMAGE_SIZE, "window_size": 14, "embed_dim": embed_dim,
            "depths": tuple(depths[s] for s in stages), "num_heads": tuple(heads[s] for s in stages),
            "num_classes": classes, "global_pool": "avg", "act_layer": "gelu"}
    released = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "num_classes": 9083}
    if all(arch[k] == v for k, v in released.items()):
        return dict(WD_TAGGER_ARCH)
    return arch


def preprocess_tagger(images: torch.Tensor, size: int = WD_IMAGE_SIZE) -> torch.Tensor:
    """Reference (B, 3, H, W) in [-1, 1] -> tagger input (B, 3, size, size) in BGR order, float32."""
    x = F.interpolate(images.float(), (size, size), mode="bicubic", align_corners=True, antialias=True)
    return x[:, [2, 1, 0]]


class WDTagger(nn.Module):
    """``encode(reference) -> (B, 196, 1024)`` tokens of the WD tagger (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        size = getattr(getattr(model, "patch_embed", None), "img_size", WD_IMAGE_SIZE)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_tagger(images, self.image_size).to(device=self.device, dtype=self.dtype)
        features = self.model.forward_features(x)             # (B, h, w, C), NHWC
        return features.flatten(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


def load_tagger(path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                arch: Optional[Mapping] = None) -> WDTagger:
    """The tagger from its ``model.safetensors`` (timm names), every parameter required. ``arch``: the SwinV2
    arguments; default: read from the file's shapes (:func:`tagger_arch_from_shapes`)."""
    from ..checkpoint import read_tensors

    try:
        tensors = read_tensors(os.fspath(path))
        if arch is None:
            arch = tagger_arch_from_shapes({k: tuple(v.shape) for k, v in tensors.items()})
    except Exception as error:
        raise CheckpointError(path, f"cannot read the WD tagger weights ({type(error).__name__}: {error})") from None
    model = build_tagger(arch)
    own = model.state_dict()
    tensors = {k: v for k, v in tensors.items() if k in own or not _DERIVED_BUFFERS.search(k)}
    missing = sorted(k for k in own if k not in tensors and not _DERIVED_BUFFERS.search(k))
    unexpected = sorted(k for k in tensors if k not in own)
    wrong = sorted(k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:4])}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise CheckpointError(path, f"the WD tagger weights do not match swinv2_base_window8_256 ({detail})")
    model.load_state_dict(tensors, strict=False)
    return WDTagger(model).to(device=device, dtype=dtype).eval()
