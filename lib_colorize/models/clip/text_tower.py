"""The OpenCLIP text tower: manipulation prompts to unit EOT embeddings (method §2.5)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidInput
from ...module_info import module_device, module_dtype
from .transformer import causal_mask, check_transformer, run_transformer

# open_clip.tokenize: <start_of_text> and <end_of_text> take two of the context_length positions (method §2.5).
SPECIAL_TOKENS = 2


def count_tokens(text: str) -> int:
    """Number of BPE tokens of ``text`` with open_clip's tokenizer, without <start_of_text>/<end_of_text>."""
    import open_clip

    tokenizer = open_clip.tokenizer._tokenizer
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
        import open_clip

        return open_clip.tokenize(list(texts), context_length=self.context_length)

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
        dtype, device = module_dtype(self), module_device(self)
        tok = self.tokenize(texts).to(device)
        x = self.token_embedding(tok).to(dtype) + self.positional_embedding.to(dtype)
        x = run_transformer(self.transformer, x, causal_mask(x.shape[1], dtype, device))
        x = self.ln_final(x)
        e = self._project(x[torch.arange(x.shape[0], device=device), tok.argmax(dim=-1)])
        return F.normalize(e, dim=-1)[:, None, :]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)
