"""Networks of ColorizeDiffusion with ldm module names (method §1.1): U-Net, KL-f8 VAE, sketch encoder.

Only the U-Net, the VAE and the sketch encoder live in the checkpoint; the CLIP towers come from open_clip
weights (``clip.py``, owned elsewhere).
"""
from __future__ import annotations

# Latent scale of the KL-f8 VAE (method §1.1, §8.5): z_unet = LATENT_SCALE * z_vae; decode(z_unet / LATENT_SCALE).
LATENT_SCALE = 0.18215

from .unet import UNetConfig, UNetModel  # noqa: E402
from .vae import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig  # noqa: E402
from .sketch_encoder import SketchEncoder, SketchEncoderConfig  # noqa: E402

__all__ = [
    "LATENT_SCALE",
    "UNetConfig",
    "UNetModel",
    "AutoencoderKL",
    "DiagonalGaussianDistribution",
    "VAEConfig",
    "SketchEncoder",
    "SketchEncoderConfig",
]
