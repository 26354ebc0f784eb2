"""The conditioner of the XL ColorizeDiffusion config: no text encoders (method-xl §10.4).

The XL checkpoints carry no text encoders and ColorizeDiffusion never uses one: while it is enabled, its denoiser
gives every U-Net call the reference tokens and ``y`` itself (``cd_webui.sampling``). The webui still asks the
model for prompt conditions (and so does a generation with the extension disabled), so this conditioner answers
with what an SDXL-style model expects -- ``{"crossattn": (B, 1, 2048), "vector": (B, 512)}``, both zero -- and
with the few text-encoder methods the webui calls on ``sd_model.cond_stage_model`` (token counting, textual
inversion shapes). Nothing is downloaded and nothing is kept in memory for it, unlike SDXL's CLIP-L and bigG text
towers (about 0.8 B parameters).
"""
from __future__ import annotations

import torch
from torch import nn

CONTEXT_DIM = 2048
VECTOR_DIM = 512
#: what the webui's prompt box shows as the token budget
TOKEN_BUDGET = 75


class ReferenceOnlyConditioner(nn.Module):
    """sgm ``GeneralConditioner`` stand-in with no embedders (see the module docstring)."""

    def __init__(self, context_dim: int = CONTEXT_DIM, vector_dim: int = VECTOR_DIM):
        super().__init__()
        self.embedders = nn.ModuleList()      # the webui's hijack and get_learned_conditioning iterate these
        self.context_dim = context_dim
        self.vector_dim = vector_dim

    def forward(self, batch: dict, force_zero_embeddings=None) -> dict:
        rows = len(batch["txt"]) if "txt" in batch else 1
        like = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        kwargs = {"device": like.device} if like is not None else {}
        return {"crossattn": torch.zeros(rows, 1, self.context_dim, **kwargs),
                "vector": torch.zeros(rows, self.vector_dim, **kwargs)}

    # --------------------------------------------------- what the webui calls on sd_model.cond_stage_model
    def tokenize(self, texts):
        return [[] for _ in texts]

    def process_texts(self, texts):
        return [[] for _ in texts], 0

    def get_target_prompt_token_count(self, token_count: int) -> int:
        return TOKEN_BUDGET

    def encode_embedding_init_text(self, init_text: str, nvpt: int) -> torch.Tensor:
        return torch.zeros(nvpt, self.context_dim)
