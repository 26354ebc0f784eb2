"""The OpenCLIP image tower as the reference encoder: reference image tokens (method §2).

The colorizers need ``ln_post`` and ``proj`` applied to *all* 257 tokens (§2.2), which open_clip's forward does not
do, so the forward is computed here from the tower's parts.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ...errors import InvalidInput
from ...module_info import module_device, module_dtype
from .preprocess import preprocess_reference
from .transformer import check_transformer, run_transformer

_instance_ids = itertools.count()


class ReferenceEncoder(nn.Module):
    """OpenCLIP image tower producing the reference tokens of method §2 (ViT-H/14: (B, 257, 1024)).

    Built from an open_clip CLIP model (only ``model.visual`` is kept; the text tower is not referenced, so it is
    freed with the model) or directly from its ``VisionTransformer``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = getattr(model, "visual", model)
        self._check_visual(visual)
        self.visual = visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_patches = visual.positional_embedding.shape[0] - 1  # N (256 for ViT-H/14 at 224)
        self.instance_id = next(_instance_ids)  # identity for ReferenceTokenCache keys

    @staticmethod
    def _check_visual(visual: nn.Module) -> None:
        for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, name):
                raise ValueError(f"unsupported open_clip vision tower {type(visual).__name__} (no {name})")
        if not isinstance(visual.conv1, nn.Conv2d) or getattr(visual, "input_patchnorm", False):
            raise ValueError("unsupported open_clip vision tower (patch-norm input)")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("unsupported open_clip vision tower (attentional pooler)")
        check_transformer(visual.transformer)

    @property
    def num_tokens(self) -> int:
        """1 + N (class token + patch tokens); 257 for ViT-H/14 at 224."""
        return self.visual.positional_embedding.shape[0]

    @property
    def output_dim(self) -> int:
        """D of the tokens (``proj`` columns; 1024 for ViT-H/14)."""
        proj = self.visual.proj
        return proj.shape[1] if proj is not None else self.visual.positional_embedding.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def _validate(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidInput("reference", f"expected an RGB image tensor (B, 3, H, W), got {shape}")
        if min(images.shape[-2:]) < 2:
            raise InvalidInput("reference", f"image is too small ({images.shape[-2]}x{images.shape[-1]} pixels)")

    def tokens_from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """ViT forward on preprocessed pixels x (B, 3, S, S) -> (B, 1+N, D) (method §2.2).

        t = conv1(x) flattened to (B, N, W); [cls; t] + P; ln_pre; all resblocks (no mask);
        out = ln_post(t) @ proj on ALL tokens (not only the pooled one, unlike open_clip's forward).
        """
        v = self.visual
        x = x.to(dtype=self.dtype, device=self.device)
        t = v.conv1(x)
        t = t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)  # (B, N, W)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], 1, -1)
        t = torch.cat([cls, t], dim=1) + v.positional_embedding.to(t.dtype)
        t = v.ln_pre(t)
        t = run_transformer(v.transformer, t)
        t = v.ln_post(t)
        return t @ v.proj if v.proj is not None else t

    @torch.no_grad()
    def encode_full(self, images: torch.Tensor) -> torch.Tensor:
        """Reference images (B, 3, H, W) in [-1, 1] -> tokens (B, 1+N, D) in the encoder dtype (method §2.1-2.3).

        Token 0 is the class token, 1..N the patch tokens in raster order. No L2 normalisation.
        """
        self._validate(images)
        return self.tokens_from_pixels(preprocess_reference(images, self.image_size))

    def encode_local(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens only: ``encode_full(images)[:, 1:]`` -> (B, N, D) (ViT-H: (B, 256, 1024)), method §2.3."""
        return self.encode_full(images)[:, 1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_full(images)
