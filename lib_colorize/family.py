"""Model families: what differs between the SD2.1-based ColorizeDiffusion models and the SDXL-based ones, as data.

The core (processors, denoiser, conditioning, pipeline, webui adapter) reads these facts from the family of the
loaded checkpoint instead of hard-coding them:

============================  =========================================  ==========================================
fact                          SD2.1 family (v1, v1.5, v2; method.md)      XL family (sdxl, xlv2; method-xl.md)
============================  =========================================  ==========================================
sketch residual blocks        input blocks 0, 3, 6, 9, 11 (§3)            input blocks 0, 3, 6, 8 (§2.3)
transformer blocks            16 (§4.1)                                  70 (§2.4)
context width                 1024 (ViT-H/14 tokens)                     2048 (ClusterConcat tokens, §3.4)
latent scale                  0.18215                                    0.13025 (§1.1)
output sizes                  multiples of 64                            multiples of 32, 768-1536 in the app (§7.2)
native size                   512 (v2: 768)                              1024
``y`` vector                  none                                       512-wide (§2.2)
============================  =========================================  ==========================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SD21_VERSIONS = ("v1", "v1.5", "v2")
XL_VERSIONS = ("sdxl", "xlv2")
VERSIONS = SD21_VERSIONS + XL_VERSIONS


@dataclass(frozen=True)
class ModelFamily:
    """The facts of one model family (see the module table)."""

    name: str
    hint_blocks: tuple[int, ...]
    transformer_blocks: int
    context_dim: int
    latent_scale: float
    size_multiple: int
    native_size: int
    vector_dim: Optional[int] = None      # width of ``y`` (label_emb input); None: the U-Net takes no ``y``
    min_size: Optional[int] = None        # the original app's size range (autofit clamps to it)
    max_size: Optional[int] = None

    @property
    def is_xl(self) -> bool:
        return self.vector_dim is not None


SD21 = ModelFamily("sd2.1", hint_blocks=(0, 3, 6, 9, 11), transformer_blocks=16, context_dim=1024,
                   latent_scale=0.18215, size_multiple=64, native_size=512)
XL = ModelFamily("sdxl", hint_blocks=(0, 3, 6, 8), transformer_blocks=70, context_dim=2048, latent_scale=0.13025,
                 size_multiple=32, native_size=1024, vector_dim=512, min_size=768, max_size=1536)

#: Native generation size per version (v2 was trained at 768 px, method §1.2).
NATIVE_SIZES = {"v1": 512, "v1.5": 512, "v2": 768, "sdxl": 1024, "xlv2": 1024}


def family_of(version: str) -> ModelFamily:
    """The family of a checkpoint version (``v1``, ``v1.5``, ``v2``, ``sdxl``, ``xlv2``)."""
    if version in XL_VERSIONS:
        return XL
    if version in SD21_VERSIONS:
        return SD21
    raise ValueError(f"unknown ColorizeDiffusion version {version!r}; expected one of {', '.join(VERSIONS)}")


def is_xl(version: Optional[str]) -> bool:
    return version in XL_VERSIONS
