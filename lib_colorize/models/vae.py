"""KL-f8 ``AutoencoderKL`` with ldm module names (method §1.1).

Keys (checkpoint prefix ``first_stage_model.`` stripped): ``encoder.{conv_in, down.L.block.B.*, down.L.downsample.conv,
mid.{block_1, attn_1, block_2}, norm_out, conv_out}``, ``decoder.{conv_in, mid.*, up.L.block.B.*,
up.L.upsample.conv, norm_out, conv_out}``, ``quant_conv``, ``post_quant_conv``. ResnetBlock: ``norm1, conv1, norm2,
conv2[, nin_shortcut]``; AttnBlock: ``norm, q, k, v, proj_out`` (1x1 convs).

Released config: ``ch 128, ch_mult [1,2,4,4], num_res_blocks 2, z_channels 4, embed_dim 4, double_z,
attn_resolutions []`` (the mid-block attention is always present). The config is inferred from the weights.
The latent scale 0.18215 (``models.LATENT_SCALE``) is applied by the callers, not here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def vae_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) of the ldm autoencoder."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3, GN-SiLU-(dropout)-conv3x3, + shortcut (1x1 ``nin_shortcut`` when widths differ).

    forward(x (B, C_in, H, W)) -> (B, C_out, H, W). No timestep input in the VAE.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = vae_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over H*W positions with 1x1-conv q/k/v/proj_out, plus residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = vae_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class EncoderDownsample(nn.Module):
    """Pad (0,1,0,1) with zeros, then conv3x3 stride 2 without padding (ldm ``Downsample(with_conv=True)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class DecoderUpsample(nn.Module):
    """nearest x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class VAEConfig:
    """ldm ``ddconfig`` + ``embed_dim`` (method §1.1 defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_levels: Sequence[int] = ()
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "VAEConfig":
        """Infer the config from tensors named without ``first_stage_model.``."""
        sd = state_dict
        conv_in = sd["encoder.conv_in.weight"]
        ch = int(conv_in.shape[0])
        levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
        ch_mult = []
        for level in levels:
            width = int(sd[f"encoder.down.{level}.block.0.conv1.weight"].shape[0])
            ch_mult.append(width // ch)
        num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        attn_levels = tuple(lv for lv in levels if f"encoder.down.{lv}.attn.0.q.weight" in sd)
        z_channels = int(sd["decoder.conv_in.weight"].shape[1])
        return cls(
            in_channels=int(conv_in.shape[1]),
            out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_levels=attn_levels,
            z_channels=z_channels,
            embed_dim=int(sd["post_quant_conv.weight"].shape[1]),
            double_z=int(sd["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
        )


def _mid_block(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*z, H/f, W/f) with f = 2^(len(ch_mult)-1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        ch = config.ch
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(config.ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(config.ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level in config.attn_levels:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(config.ch_mult) - 1:
                stage.downsample = EncoderDownsample(block_in)
            self.down.append(stage)
        self.mid = _mid_block(block_in)
        self.norm_out = vae_norm(block_in)
        z_out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f) (no clamping)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        ch = config.ch
        block_in = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in)
        stages = []
        for level in reversed(range(len(config.ch_mult))):
            block_out = ch * config.ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level in config.attn_levels:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = DecoderUpsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # up[level], run from the last level down to 0
        self.norm_out = vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Posterior N(mean, std^2) from moments (B, 2*z, h, w) = [mean ; logvar], logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, self.logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) drawn on the generator's device (CPU by default, method §10.4)."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """encode(x (B,3,H,W) in [-1,1]) -> DiagonalGaussianDistribution over (B, embed_dim, H/8, W/8);
    decode(z (B, embed_dim, h, w)) -> (B, 3, 8h, 8w) (unscaled VAE latents: callers divide by 0.18215 first)."""

    def __init__(self, config: Optional[VAEConfig] = None):
        super().__init__()
        config = VAEConfig() if config is None else config
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.z_channels if config.double_z else config.z_channels
        self.quant_conv = nn.Conv2d(moments, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @staticmethod
    def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Reshape Linear-style (C, C) attention q/k/v/proj_out weights (some converted files) to (C, C, 1, 1)."""
        out = {}
        for key, value in state_dict.items():
            if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.dim() == 2:
                value = value[:, :, None, None]
            out[key] = value
        return out

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> "AutoencoderKL":
        """Build with the config inferred from ``state_dict`` and load it (keeps the tensors' dtype)."""
        sd = cls.normalize_state_dict(state_dict)
        model = cls(VAEConfig.from_state_dict(sd))
        model.load_state_dict(sd, strict=strict)
        return model.to(sd["encoder.conv_in.weight"].dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x.to(self.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = False) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z)
