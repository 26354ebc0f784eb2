"""OpenCLIP towers of ColorizeDiffusion: reference image tokens (method §2) and text EOT embeddings (§2.5).

Both towers are built with ``open_clip.create_model(arch, pretrained=None)`` and loaded from an open_clip state
dict, but their forwards are computed here, never by open_clip (method §1.5): the colorizers need ``ln_post`` and
``proj`` applied to *all* 257 tokens (§2.2), which open_clip's forward does not do, and open_clip changed the
tensor layout of its ``Transformer`` in 2.26 (sequence-first before, batch-first after). Every residual block is
therefore evaluated from its parts (:func:`residual_block`): the token-wise parts (``ln_1``, ``ls_1``, ``ln_2``,
``mlp``, ``ls_2``) are called on batch-first tensors, and the attention is computed from the packed
``in_proj``/``out_proj`` parameters. Nothing depends on open_clip's layout, so the results are the same on
open-clip-torch 2.20 (what A1111 pins) and 3.x.

Public API:

* :class:`ReferenceEncoder` -- ``encode_full(images) -> (B, 1+N, D)``, ``encode_local(images) -> (B, N, D)``.
* :class:`TextEncoder` -- ``encode(texts) -> (N, 1, D)`` (unit norm), ``count_tokens(text)``.
* :func:`load_clip` -- weights resolution (file, models folder, Hugging Face download) and loading.
* :class:`ReferenceTokenCache` -- bounded LRU of reference tokens keyed by the image content.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InvalidInput, MissingWeights

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "ViT-H-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b79k"
# Where the ViT-H/14 weights of method §1.5 come from, and the names we accept in a models folder.
HF_REPO_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HF_FILENAME = "open_clip_pytorch_model.bin"
LOCAL_WEIGHT_NAMES = (
    "open_clip_pytorch_model.safetensors",
    "open_clip_model.safetensors",  # the safetensors name used in the laion Hugging Face repositories
    "open_clip_pytorch_model.bin",
)
# CLIP image normalisation (method §2.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip.tokenize: <start_of_text> and <end_of_text> take two of the context_length positions (method §2.5).
SPECIAL_TOKENS = 2


def _open_clip():
    """Import open_clip lazily: it is heavy (pulls in timm) and only the CLIP paths need it."""
    import open_clip

    return open_clip


# --------------------------------------------------------------------------------------------------------------
# Preprocessing (method §2.1, mid-2024 kornia form)
# --------------------------------------------------------------------------------------------------------------


def gaussian_taps(sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """1-D Gaussian taps of the kornia antialias pre-blur (method §2.1 step 1).

    k = int(max(4 sigma, 3)), +1 if even; g(i) = exp(-i^2 / (2 sigma^2)) for i = -k//2 .. k//2, normalised to
    sum 1. Computed in float64, returned as ``dtype``. Shape (k,).
    """
    k = int(max(4.0 * sigma, 3.0))
    if k % 2 == 0:
        k += 1
    i = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(i**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def antialias_sigma(factor: float) -> float:
    """sigma = max((f - 1) / 2, 0.001) for a per-axis downscale factor f = size_in / size_out (method §2.1)."""
    return max((factor - 1.0) / 2.0, 0.001)


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate every channel of x (B, C, H, W) with ``taps`` along ``dim`` (2 = H, 3 = W), reflect padding."""
    b, c, h, w = x.shape
    k = taps.numel()
    p = k // 2
    if dim == 3:
        x = F.pad(x, (p, p, 0, 0), mode="reflect")
        weight = taps.view(1, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, p, p), mode="reflect")
        weight = taps.view(1, 1, k, 1)
    weight = weight.to(x.dtype).expand(c, 1, *weight.shape[2:]).contiguous()
    return F.conv2d(x, weight, groups=c)


def gaussian_preblur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, same size: along W with sigma_x, then along H with sigma_y.

    (B, C, H, W) -> (B, C, H, W). kornia's ``gaussian_blur2d(..., border_type='reflect', separable=True)``.
    """
    x = _blur_axis(x, gaussian_taps(sigma_x, torch.float64, x.device), dim=3)
    return _blur_axis(x, gaussian_taps(sigma_y, torch.float64, x.device), dim=2)


def kornia_resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``kornia.geometry.resize(x, size, 'bicubic', align_corners=True, antialias=True)`` (kornia 0.6.6-0.7.4).

    Method §2.1: unchanged if already ``size``; if max(f_y, f_x) > 1 with f = H/size_h, W/size_w, pre-blur
    with :func:`gaussian_preblur` (sigma per axis from :func:`antialias_sigma`); then
    ``F.interpolate(size, mode='bicubic', align_corners=True)``, no clamping. (B, C, H, W) -> (B, C, *size).
    """
    h, w = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return x
    fy, fx = h / size[0], w / size[1]
    if max(fy, fx) > 1:
        x = gaussian_preblur(x, antialias_sigma(fy), antialias_sigma(fx))
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> CLIP input: x' = ((x + 1)/2 - mean) / std per channel (method §2.1). (B, 3, H, W)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x + 1.0) / 2.0 - mean) / std


def preprocess_reference(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Reference (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, size, size), float32 (method §2.1).

    Squash resize (aspect ratio not kept) in the kornia form, then :func:`clip_normalize`.
    """
    x = images.float() if images.dtype != torch.float64 else images
    return clip_normalize(kornia_resize(x, (size, size)))


# --------------------------------------------------------------------------------------------------------------
# Transformer pieces, computed batch-first and independent of open_clip's layout (method §1.5)
# --------------------------------------------------------------------------------------------------------------


def _check_attention(attn: nn.Module) -> None:
    """Accept only the plain packed-projection ``nn.MultiheadAttention`` that open_clip's CLIP blocks use."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"unsupported open_clip attention module {type(attn).__name__}")
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("unsupported nn.MultiheadAttention configuration (separate q/k/v, bias_kv or zero_attn)")


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head self-attention from the parameters of ``attn``; x (B, L, D) -> (B, L, D).

    [q|k|v] = x W_in^T + b_in (W_in (3D, D) packed as q, k, v); per head h (width d = D/H):
    o_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h; out = concat_h(o_h) W_out^T + b_out.
    ``mask``: additive float (L, L) (-inf = blocked) or None.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(b, n, d)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


def residual_block(block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` on batch-first x (B, L, D):

    x = x + ls_1(attn(ln_1(x), mask)); x = x + ls_2(mlp(ln_2(x))), mlp = c_proj(gelu(c_fc(.))).
    ln/ls/mlp are token-wise modules (layout-free); the attention is :func:`self_attention`.
    """
    x = x + block.ls_1(self_attention(block.attn, block.ln_1(x), mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def check_transformer(transformer: nn.Module) -> None:
    """Fail early on blocks this module does not compute (cosine attention, cross-attention blocks, ...)."""
    for block in transformer.resblocks:
        for name in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
            if not hasattr(block, name):
                raise ValueError(f"unsupported open_clip residual block {type(block).__name__} (no {name})")
        if hasattr(block, "ln_attn"):
            raise ValueError(f"unsupported open_clip residual block {type(block).__name__} (ln_attn)")
        _check_attention(block.attn)


def run_transformer(transformer: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All ``transformer.resblocks`` in order on batch-first x (B, L, D) (method §2.2: all layers, no early exit)."""
    for block in transformer.resblocks:
        x = residual_block(block, x, mask)
    return x


def causal_mask(n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask (n, n): 0 on and below the diagonal, -inf above (open_clip text tower)."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)


def _params_dtype_device(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    p = next(module.parameters())
    return p.dtype, p.device


# --------------------------------------------------------------------------------------------------------------
# Reference (image) encoder, method §2
# --------------------------------------------------------------------------------------------------------------

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
        return _params_dtype_device(self)[0]

    @property
    def device(self) -> torch.device:
        return _params_dtype_device(self)[1]

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


# --------------------------------------------------------------------------------------------------------------
# Text encoder, method §2.5
# --------------------------------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """Number of BPE tokens of ``text`` with open_clip's tokenizer, without <start_of_text>/<end_of_text>."""
    tokenizer = _open_clip().tokenizer._tokenizer
    return len(tokenizer.encode(text))


class TextEncoder(nn.Module):
    """OpenCLIP text tower: prompts -> L2-normalised EOT embeddings (N, 1, D) (method §2.5, mid-2024 form).

    Keeps only ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final`` and
    ``text_projection``; its ``state_dict`` keys are exactly those of an open_clip CLIP state dict's text part.
    """

    manipulation_field = "manipulations"

    def __init__(self, model: nn.Module):
        super().__init__()
        src = model.text if hasattr(model, "text") and not hasattr(model, "token_embedding") else model
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if getattr(src, name, None) is None:
                raise ValueError(f"unsupported open_clip text tower {type(src).__name__} (no {name})")
        check_transformer(src.transformer)
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection

    @property
    def context_length(self) -> int:
        """77 for CLIP."""
        return self.positional_embedding.shape[0]

    @property
    def max_prompt_tokens(self) -> int:
        """context_length - 2 = 75: the longest prompt that is not truncated."""
        return self.context_length - SPECIAL_TOKENS

    def count_tokens(self, text: str) -> int:
        """See :func:`count_tokens`."""
        return count_tokens(text)

    def validate(self, texts: Sequence[str]) -> None:
        """Raise :class:`InvalidInput` (field 'manipulations') for a prompt longer than 75 tokens."""
        limit = self.max_prompt_tokens
        for text in texts:
            n = count_tokens(text)
            if n > limit:
                raise InvalidInput(
                    self.manipulation_field,
                    f"prompt {text!r} is {n} tokens long; the CLIP text encoder takes at most {limit} tokens",
                )

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip.tokenize -> (N, context_length) int64: SOT, BPE ids, EOT (largest id), zero padding."""
        return _open_clip().tokenize(list(texts), context_length=self.context_length)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        p = self.text_projection
        return p(x) if isinstance(p, nn.Module) else x @ p

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (N, 1, D) unit vectors (method §2.5).

        x = token_embedding(tok) + P; all resblocks with the causal mask; ln_final;
        e = x[n, argmax(tok_n)] projected by text_projection; e / ||e||_2.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        self.validate(texts)
        dtype, device = _params_dtype_device(self)
        tok = self.tokenize(texts).to(device)
        x = self.token_embedding(tok).to(dtype) + self.positional_embedding.to(dtype)
        x = run_transformer(self.transformer, x, causal_mask(x.shape[1], dtype, device))
        x = self.ln_final(x)
        e = self._project(x[torch.arange(x.shape[0], device=device), tok.argmax(dim=-1)])
        return F.normalize(e, dim=-1)[:, None, :]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)


# --------------------------------------------------------------------------------------------------------------
# Weights resolution and loading (method §1.5)
# --------------------------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_source(arch: str, pretrained: Optional[str]) -> Optional[Tuple[str, str]]:
    """(repo_id, filename) on the Hugging Face hub for an open_clip (arch, pretrained tag), or None."""
    if not pretrained:
        return None
    if arch == DEFAULT_ARCH and pretrained == DEFAULT_PRETRAINED:
        return HF_REPO_VIT_H, HF_FILENAME
    try:
        cfg = _open_clip().pretrained.get_pretrained_cfg(arch, pretrained) or {}
    except Exception:  # an unknown arch/tag is reported by the caller as missing weights
        return None
    hub = (cfg.get("hf_hub") or "").strip("/")
    if not hub:
        return None
    parts = hub.split("/")
    return ("/".join(parts[:2]), parts[2] if len(parts) > 2 else HF_FILENAME)


def find_local_weights(models_dir: Optional[str]) -> Optional[str]:
    """First of :data:`LOCAL_WEIGHT_NAMES` present in ``models_dir`` (None if none or no folder)."""
    if not models_dir:
        return None
    for name in LOCAL_WEIGHT_NAMES:
        path = os.path.join(models_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _hf_download(repo_id: str, filename: str, models_dir: Optional[str]) -> str:
    """huggingface_hub.hf_hub_download into ``models_dir`` (HF cache if None); honours HF_ENDPOINT; tqdm bar."""
    import huggingface_hub

    logger.info("ColorizeDiffusion: downloading %s from %s into %s", filename, repo_id, models_dir or "the HF cache")
    if models_dir:
        os.makedirs(models_dir, exist_ok=True)
    return huggingface_hub.hf_hub_download(repo_id, filename, local_dir=models_dir)


def _missing_message(arch: str, source: Optional[Tuple[str, str]], models_dir: Optional[str], reason: str) -> str:
    folder = os.path.abspath(models_dir) if models_dir else "a folder of your choice and pass it as models_dir"
    if source is not None:
        repo_id, filename = source
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        where = f" (download it from {endpoint}/{repo_id}/resolve/main/{filename})"
    else:
        filename, where = HF_FILENAME, ""
    return (
        f"ColorizeDiffusion: OpenCLIP {arch} weights are missing ({reason}). "
        f"Put '{filename}'{where} into {folder}."
    )


def resolve_clip_weights(
    arch: str = DEFAULT_ARCH,
    weights: Optional[str] = None,
    pretrained: Optional[str] = DEFAULT_PRETRAINED,
    models_dir: Optional[str] = None,
    allow_download: bool = True,
) -> str:
    """Path of the open_clip weights (method §1.5): explicit ``weights`` > a file of :data:`LOCAL_WEIGHT_NAMES`
    in ``models_dir`` > download of the pretrained tag into ``models_dir``.

    Raises :class:`MissingWeights` naming the file, the folder and the source when nothing is usable
    (explicit file absent; offline: ``allow_download=False`` or HF_HUB_OFFLINE=1; or the download failed).
    """
    if weights:
        if not os.path.isfile(weights):
            raise MissingWeights(f"ColorizeDiffusion: OpenCLIP weights file {os.fspath(weights)} does not exist.")
        return os.fspath(weights)
    local = find_local_weights(models_dir)
    if local:
        return local
    source = hf_source(arch, pretrained)
    if source is None:
        raise MissingWeights(_missing_message(arch, None, models_dir, f"no download source for '{pretrained}'"))
    if not allow_download or _env_flag("HF_HUB_OFFLINE"):
        raise MissingWeights(_missing_message(arch, source, models_dir, "downloads are disabled"))
    try:
        return _hf_download(source[0], source[1], models_dir)
    except Exception as e:  # network, HTTP, disk: all mean "put the file there yourself"
        raise MissingWeights(_missing_message(arch, source, models_dir, f"download failed: {e}")) from e


def read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """Load an open_clip state dict: .safetensors via safetensors, anything else via torch.load(weights_only=True).

    Unwraps a training checkpoint's ``state_dict`` and strips a ``module.`` prefix. CheckpointError on failure.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(path, f"cannot read OpenCLIP weights ({type(e).__name__}: {e})") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(path, "not an OpenCLIP state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def split_state_dict(sd: Mapping[str, torch.Tensor]) -> Tuple[dict, dict]:
    """(visual part with 'visual.' stripped, text part) of a CLIP (or CustomTextCLIP 'text.') state dict."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if any(k.startswith("text.") for k in sd):
        text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    else:
        text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    return visual, text


def _load_part(module: nn.Module, part: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Strict load of one tower; a mismatch is a CheckpointError naming a few keys/shapes."""
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
    module.load_state_dict({k: part[k] for k in own}, strict=True)


@dataclass
class ClipEncoders:
    """What :func:`load_clip` returns: the requested towers (None when not requested) and the weights used."""

    reference: Optional[ReferenceEncoder]
    text: Optional[TextEncoder]
    weights_path: str
    arch: str


def load_clip(
    arch: str = DEFAULT_ARCH,
    weights: Optional[str] = None,
    pretrained: Optional[str] = DEFAULT_PRETRAINED,
    models_dir: Optional[str] = None,
    allow_download: bool = True,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    towers: Iterable[str] = ("visual", "text"),
) -> ClipEncoders:
    """Build the requested towers of ``arch`` with open_clip (``create_model(arch, pretrained=None)``) and load
    them from the weights of :func:`resolve_clip_weights`. Towers are frozen, in eval mode, on ``device``/``dtype``.

    ``towers``: subset of ('visual', 'text'); the other tower is dropped before loading to save memory.
    """
    towers = tuple(towers)
    unknown = set(towers) - {"visual", "text"}
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of ('visual', 'text'), got {towers}")
    path = resolve_clip_weights(arch, weights, pretrained, models_dir, allow_download)
    sd = read_state_dict(path)
    visual_sd, text_sd = split_state_dict(sd)
    model = _open_clip().create_model(arch, pretrained=None)
    reference = ReferenceEncoder(model) if "visual" in towers else None
    text = TextEncoder(model) if "text" in towers else None
    del model  # the towers not requested go with it
    if reference is not None:
        _load_part(reference.visual, visual_sd, path, "image tower")
    if text is not None:
        _load_part(text, text_sd, path, "text tower")
    del sd, visual_sd, text_sd
    for enc in (reference, text):
        if enc is not None:
            enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipEncoders(reference=reference, text=text, weights_path=path, arch=arch)


# --------------------------------------------------------------------------------------------------------------
# Reference token cache
# --------------------------------------------------------------------------------------------------------------


def image_digest(image: torch.Tensor) -> str:
    """sha256 over shape, dtype and the raw bytes of the (contiguous, CPU) tensor."""
    t = image.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReferenceTokenCache:
    """Bounded LRU of full reference tokens (method §2.3) keyed by image content and encoder identity.

    ``get_or_encode(encoder, image)`` returns ``encoder.encode_full(image)`` (a copy), encoding only on a miss;
    ``encode_calls`` counts the encoder calls (0 on a repeated generation with the same reference).
    """

    def __init__(self, max_entries: int = 8):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self._entries: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()
        self.encode_calls = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(encoder: ReferenceEncoder, image: torch.Tensor) -> tuple:
        """(image digest, encoder instance, encoder dtype, encoder device)."""
        dtype, device = _params_dtype_device(encoder)
        return (image_digest(image), getattr(encoder, "instance_id", id(encoder)), str(dtype), str(device))

    def get_or_encode(self, encoder: ReferenceEncoder, image: torch.Tensor, local: bool = False) -> torch.Tensor:
        """Full tokens (B, 1+N, D), or patch tokens (B, N, D) with ``local=True``."""
        key = self.key(encoder, image)
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if tokens is None:
            tokens = encoder.encode_full(image)
            with self._lock:
                self.encode_calls += 1
                self._entries[key] = tokens
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        out = tokens.clone()
        return out[:, 1:] if local else out

    def clear(self) -> None:
        """Drop all entries (counters are kept)."""
        with self._lock:
            self._entries.clear()


__all__ = [
    "DEFAULT_ARCH",
    "DEFAULT_PRETRAINED",
    "HF_REPO_VIT_H",
    "HF_FILENAME",
    "LOCAL_WEIGHT_NAMES",
    "CLIP_MEAN",
    "CLIP_STD",
    "gaussian_taps",
    "antialias_sigma",
    "gaussian_preblur",
    "kornia_resize",
    "clip_normalize",
    "preprocess_reference",
    "self_attention",
    "residual_block",
    "run_transformer",
    "causal_mask",
    "ReferenceEncoder",
    "TextEncoder",
    "count_tokens",
    "hf_source",
    "find_local_weights",
    "resolve_clip_weights",
    "read_state_dict",
    "split_state_dict",
    "ClipEncoders",
    "load_clip",
    "image_digest",
    "ReferenceTokenCache",
]
