"""OpenCLIP towers of ColorizeDiffusion: reference image tokens (method §2) and text EOT embeddings (§2.5).

The towers are open_clip modules, but their forwards are computed here, never by open_clip (method §1.5), so that
open-clip-torch 2.20 (what A1111 pins) and 3.x give the same tokens. By concern:

* :mod:`.preprocess` -- the reference's resize and normalisation (§2.1).
* :mod:`.transformer` -- open_clip's residual blocks evaluated batch-first from their parts.
* :mod:`.image_tower` -- :class:`ReferenceEncoder`: ``encode_full(images) -> (B, 1+N, D)``,
  ``encode_local(images) -> (B, N, D)``.
* :mod:`.text_tower` -- :class:`TextEncoder`: ``encode(texts) -> (N, 1, D)`` (unit norm), :func:`count_tokens`.
* :mod:`.loading` -- :func:`load_clip`: the weight file (found, or downloaded through :mod:`lib_colorize.weights`),
  only the towers asked for, built without initialisation and filled straight from the file.
* :mod:`.token_cache` -- :class:`ReferenceTokenCache`, a bounded LRU of reference tokens keyed by image content.
"""
from .image_tower import ReferenceEncoder
from .loading import (DEFAULT_ARCH, DEFAULT_PRETRAINED, HF_FILENAME, HF_REPO_VIT_H, LOCAL_WEIGHT_NAMES, TOWERS,
                      ClipEncoders, build_tower, known_architectures, load_clip, model_config, output_width,
                      resolve_clip_weights, split_state_dict)
from .preprocess import (CLIP_MEAN, CLIP_STD, antialias_sigma, clip_normalize, gaussian_preblur, gaussian_taps,
                         kornia_resize, preprocess_reference)
from .text_tower import SPECIAL_TOKENS, TextEncoder, count_tokens
from .token_cache import ReferenceTokenCache, image_digest
from .transformer import causal_mask, residual_block, run_transformer, self_attention

__all__ = [
    "DEFAULT_ARCH", "DEFAULT_PRETRAINED", "HF_REPO_VIT_H", "HF_FILENAME", "LOCAL_WEIGHT_NAMES", "TOWERS", "CLIP_MEAN",
    "CLIP_STD", "SPECIAL_TOKENS", "gaussian_taps", "antialias_sigma", "gaussian_preblur", "kornia_resize",
    "clip_normalize", "preprocess_reference", "self_attention", "residual_block", "run_transformer", "causal_mask",
    "ReferenceEncoder", "TextEncoder", "count_tokens", "known_architectures", "model_config", "output_width",
    "build_tower", "resolve_clip_weights", "split_state_dict", "ClipEncoders", "load_clip", "image_digest",
    "ReferenceTokenCache",
]
