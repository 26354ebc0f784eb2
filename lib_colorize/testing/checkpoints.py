"""Random checkpoints in the released ColorizeDiffusion key layout (method §1.4, §3, §11), for tests and benches.

The layout is written out here key by key from the specification (ldm names), independently of the model classes
in ``lib_colorize.models``, so loading a generated file with ``strict=True`` checks that the models really match the
released naming.

* ``make_checkpoint(path, version, size)``: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE, fp16
  like the release), ``control_encoder.*`` (sketch encoder), schedule buffers, plus the version's extra modules:
  v1.5 LoRA on all 16 ``attn2`` + ``transformer.*`` + ``thresh_embedder.*``; v2 LoRA on output-block ``attn2`` +
  ``warp_modules`` / ``style_modules`` + ``bg_encoder.*`` / ``style_encoder.*``, with exactly the released names and
  shapes of method-enhance §2 (the loader builds the enhance modules from them).
* ``make_sd_checkpoint(path)``: a small plain SD 1.x/2.x checkpoint (``cond_stage_model.*``, no ``control_encoder``).

Weights are non-zero everywhere (method §10.1: zero-initialised layers would hide bugs): weights
N(0, 1/fan_in), norm scales 1 + N(0, 0.1), biases N(0, 0.02). Tensors are generated one at a time from a per-key seed
and streamed to disk, so ``size="full"`` (≈ 4 GB) needs little memory.

Command line: ``python -m lib_colorize.testing.checkpoints --out F --version v1 --size tiny``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..schedule import ldm_schedule_buffers

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SKETCH_PREFIX = "control_encoder."

# key -> (shape, kind); kind in {"weight", "norm", "bias", "buffer:<name>"}
Layout = Dict[str, Tuple[Tuple[int, ...], str]]


@dataclass(frozen=True)
class Dims:
    """Dimensions of a generated checkpoint."""

    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    attention_levels: Tuple[int, ...]
    context_dim: int
    linear_proj: bool
    vae_ch: int
    vae_ch_mult: Tuple[int, ...]
    vae_num_res_blocks: int
    sketch_stem: Tuple[int, ...]
    sketch_hints: Tuple[int, ...]
    cluster_tokens: int  # v1.5 ClusterTransformer token length
    thresh_dim: int      # v1.5 thresh_embedder sinusoid width


FULL = Dims(320, (1, 2, 4, 4), 2, (0, 1, 2), 1024, False, 128, (1, 2, 4, 4), 2,
            (16, 16, 32, 32, 96, 96, 256, 320), (320, 640, 1280, 1280), 256, 256)


def tiny_dims(context_dim: int = 64) -> Dims:
    """model_channels 32 (widths 32/64/128/128), VAE ch 32, sketch encoder scaled down (stem 8..64, hints = U-Net)."""
    return Dims(32, (1, 2, 4, 4), 2, (0, 1, 2), context_dim, False, 32, (1, 2, 4, 4), 2,
                (8, 8, 16, 16, 32, 32, 64, 32), (32, 64, 128, 128), 16, 32)


def dims_for(size: "str | Dims", context_dim: Optional[int] = None) -> Dims:
    """The dims of a size name ("tiny", "full"), or ``size`` itself when it is a :class:`Dims` (benches)."""
    if isinstance(size, Dims):
        return size if context_dim is None else _replace(size, context_dim=context_dim)
    if size == "full":
        return FULL if context_dim is None else _replace(FULL, context_dim=context_dim)
    if size == "tiny":
        return tiny_dims(64 if context_dim is None else context_dim)
    raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")


def _replace(dims: Dims, **changes) -> Dims:
    values = dict(dims.__dict__)
    values.update(changes)
    return Dims(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Layout builders (ldm names, method §1.4)


def _linear(lay: Layout, name: str, c_out: int, c_in: int, bias: bool = True) -> None:
    lay[f"{name}.weight"] = ((c_out, c_in), "weight")
    if bias:
        lay[f"{name}.bias"] = ((c_out,), "bias")


def _conv(lay: Layout, name: str, c_out: int, c_in: int, k: int) -> None:
    lay[f"{name}.weight"] = ((c_out, c_in, k, k), "weight")
    lay[f"{name}.bias"] = ((c_out,), "bias")


def _norm(lay: Layout, name: str, c: int) -> None:
    lay[f"{name}.weight"] = ((c,), "norm")
    lay[f"{name}.bias"] = ((c,), "bias")


def _unet_resblock(lay: Layout, p: str, c_in: int, c_out: int, emb: int) -> None:
    _norm(lay, f"{p}.in_layers.0", c_in)
    _conv(lay, f"{p}.in_layers.2", c_out, c_in, 3)
    _linear(lay, f"{p}.emb_layers.1", c_out, emb)
    _norm(lay, f"{p}.out_layers.0", c_out)
    _conv(lay, f"{p}.out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        _conv(lay, f"{p}.skip_connection", c_out, c_in, 1)


def _attention(lay: Layout, p: str, c: int, c_ctx: int) -> None:
    _linear(lay, f"{p}.to_q", c, c, bias=False)
    _linear(lay, f"{p}.to_k", c, c_ctx, bias=False)
    _linear(lay, f"{p}.to_v", c, c_ctx, bias=False)
    _linear(lay, f"{p}.to_out.0", c, c)


def _spatial_transformer(lay: Layout, p: str, c: int, ctx: int, linear: bool) -> None:
    _norm(lay, f"{p}.norm", c)
    if linear:
        _linear(lay, f"{p}.proj_in", c, c)
        _linear(lay, f"{p}.proj_out", c, c)
    else:
        _conv(lay, f"{p}.proj_in", c, c, 1)
        _conv(lay, f"{p}.proj_out", c, c, 1)
    tb = f"{p}.transformer_blocks.0"
    _attention(lay, f"{tb}.attn1", c, c)
    _linear(lay, f"{tb}.ff.net.0.proj", 8 * c, c)
    _linear(lay, f"{tb}.ff.net.2", c, 4 * c)
    _attention(lay, f"{tb}.attn2", c, ctx)
    for i in (1, 2, 3):
        _norm(lay, f"{tb}.norm{i}", c)


def unet_input_layout(d: Dims, p: str = "", transformer=None, in_channels: int = 4) -> Tuple[Layout, list]:
    """``time_embed`` + ``input_blocks`` (shared by the U-Net and v2's UNetEncoders); returns the skip widths too.

    ``transformer(lay, prefix, channels, level)`` writes an attention block's SpatialTransformer (default: SD2's)."""
    lay: Layout = {}
    mc, emb = d.model_channels, 4 * d.model_channels
    _linear(lay, f"{p}time_embed.0", emb, mc)
    _linear(lay, f"{p}time_embed.2", emb, emb)
    _conv(lay, f"{p}input_blocks.0.0", mc, in_channels, 3)
    skips, c, n = [mc], mc, 1
    for level, mult in enumerate(d.channel_mult):
        for _ in range(d.num_res_blocks):
            _unet_resblock(lay, f"{p}input_blocks.{n}.0", c, mult * mc, emb)
            c = mult * mc
            if level in d.attention_levels:
                if transformer is None:
                    _spatial_transformer(lay, f"{p}input_blocks.{n}.1", c, d.context_dim, d.linear_proj)
                else:
                    transformer(lay, f"{p}input_blocks.{n}.1", c, level)
            skips.append(c)
            n += 1
        if level != len(d.channel_mult) - 1:
            _conv(lay, f"{p}input_blocks.{n}.0.op", c, c, 3)
            skips.append(c)
            n += 1
    return lay, skips


def unet_layout(d: Dims) -> Layout:
    """SD-2.x U-Net keys without ``model.diffusion_model.`` (method §1.1, §1.4)."""
    lay, skips = unet_input_layout(d)
    mc, emb = d.model_channels, 4 * d.model_channels
    c = mc * d.channel_mult[-1]
    _unet_resblock(lay, "middle_block.0", c, c, emb)
    _spatial_transformer(lay, "middle_block.1", c, d.context_dim, d.linear_proj)
    _unet_resblock(lay, "middle_block.2", c, c, emb)
    n = 0
    for level in reversed(range(len(d.channel_mult))):
        for i in range(d.num_res_blocks + 1):
            c_out = mc * d.channel_mult[level]
            _unet_resblock(lay, f"output_blocks.{n}.0", c + skips.pop(), c_out, emb)
            c = c_out
            if level in d.attention_levels:
                _spatial_transformer(lay, f"output_blocks.{n}.1", c, d.context_dim, d.linear_proj)
            if level and i == d.num_res_blocks:
                # the Upsample sits after the transformer (index 2) or after the ResBlock (index 1)
                _conv(lay, f"output_blocks.{n}.{2 if level in d.attention_levels else 1}.conv", c, c, 3)
            n += 1
    _norm(lay, "out.0", c)
    _conv(lay, "out.2", 4, c, 3)
    return lay


def transformer_prefixes(d: Dims) -> list:
    """Key prefixes of the SpatialTransformers in DFS order (method §4.1): input, middle, output blocks."""
    blocks_per_level = d.num_res_blocks
    inputs, n = [], 1
    for level in range(len(d.channel_mult)):
        for _ in range(blocks_per_level):
            if level in d.attention_levels:
                inputs.append(f"input_blocks.{n}.1")
            n += 1
        n += level != len(d.channel_mult) - 1
    outputs, n = [], 0
    for level in reversed(range(len(d.channel_mult))):
        for _ in range(blocks_per_level + 1):
            if level in d.attention_levels:
                outputs.append(f"output_blocks.{n}.1")
            n += 1
    return inputs + ["middle_block.1"] + outputs


def _vae_resblock(lay: Layout, p: str, c_in: int, c_out: int) -> None:
    _norm(lay, f"{p}.norm1", c_in)
    _conv(lay, f"{p}.conv1", c_out, c_in, 3)
    _norm(lay, f"{p}.norm2", c_out)
    _conv(lay, f"{p}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(lay, f"{p}.nin_shortcut", c_out, c_in, 1)


def _vae_mid(lay: Layout, p: str, c: int) -> None:
    _vae_resblock(lay, f"{p}.block_1", c, c)
    _norm(lay, f"{p}.attn_1.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        _conv(lay, f"{p}.attn_1.{name}", c, c, 1)
    _vae_resblock(lay, f"{p}.block_2", c, c)


def vae_layout(d: Dims, z_channels: int = 4, embed_dim: int = 4) -> Layout:
    """KL-f8 AutoencoderKL keys without ``first_stage_model.`` (method §1.1; ``attn_resolutions []``)."""
    lay: Layout = {}
    ch, mult, nrb = d.vae_ch, d.vae_ch_mult, d.vae_num_res_blocks
    _conv(lay, "encoder.conv_in", ch, 3, 3)
    c = ch
    for level, m in enumerate(mult):
        for j in range(nrb):
            _vae_resblock(lay, f"encoder.down.{level}.block.{j}", c, ch * m)
            c = ch * m
        if level != len(mult) - 1:
            _conv(lay, f"encoder.down.{level}.downsample.conv", c, c, 3)
    _vae_mid(lay, "encoder.mid", c)
    _norm(lay, "encoder.norm_out", c)
    _conv(lay, "encoder.conv_out", 2 * z_channels, c, 3)

    c = ch * mult[-1]
    _conv(lay, "decoder.conv_in", c, z_channels, 3)
    _vae_mid(lay, "decoder.mid", c)
    for level in reversed(range(len(mult))):
        for j in range(nrb + 1):
            _vae_resblock(lay, f"decoder.up.{level}.block.{j}", c, ch * mult[level])
            c = ch * mult[level]
        if level != 0:
            _conv(lay, f"decoder.up.{level}.upsample.conv", c, c, 3)
    _norm(lay, "decoder.norm_out", c)
    _conv(lay, "decoder.conv_out", 3, c, 3)
    _conv(lay, "quant_conv", 2 * embed_dim, 2 * z_channels, 1)
    _conv(lay, "post_quant_conv", z_channels, embed_dim, 1)
    return lay


def sketch_encoder_layout(d: Dims) -> Layout:
    """``MultiEncoder`` keys without ``control_encoder.`` (method §3)."""
    lay: Layout = {}
    c = 3
    for index, c_out in zip(range(0, 16, 2), d.sketch_stem):
        _conv(lay, f"model.{index}", c_out, c, 3)
        c = c_out
    _conv(lay, "zero_layer.0", c, c, 1)
    for i, c_out in enumerate(d.sketch_hints):
        _conv(lay, f"output_blocks.{i}.1", c_out, c, 3)
        _conv(lay, f"output_blocks.{i}.3", c_out, c_out, 3)
        _conv(lay, f"zero_blocks.{i}.0", c_out, c_out, 1)
        c = c_out
    return lay


def _transformer_widths(d: Dims) -> Dict[str, int]:
    """SpatialTransformer prefix -> channels."""
    lay = unet_layout(d)
    return {p: lay[f"{p}.norm.weight"][0][0] for p in transformer_prefixes(d)}


def lora_layout(d: Dims, prefixes: Iterable[str], bg_rank: Optional[int]) -> Layout:
    """``SplitLoraInjectedLinear`` tensors on attn2 q/k/v (method §1.2, §1.4): fg rank 4; bg rank
    ½·min(in, out) when ``bg_rank`` is None (v1.5), else ``bg_rank`` (v2: 4). No biases."""
    lay: Layout = {}
    widths = _transformer_widths(d)
    for p in prefixes:
        c = widths[p]
        for proj, c_in in (("to_q", c), ("to_k", d.context_dim), ("to_v", d.context_dim)):
            base = f"{p}.transformer_blocks.0.attn2.{proj}"
            rank_bg = min(c_in, c) // 2 if bg_rank is None else bg_rank
            for side, rank in (("fg", 4), ("bg", rank_bg)):
                lay[f"{base}.lora_down_{side}.weight"] = ((rank, c_in), "weight")
                lay[f"{base}.lora_up_{side}.weight"] = ((c, rank), "weight")
    return lay


def cluster_transformer_layout(d: Dims, layers: int = 6) -> Layout:
    """v1.5 ``transformer.*`` (ClusterTransformer: LayerNorms, attention, MLP; token embedding)."""
    lay: Layout = {"embedding": ((d.cluster_tokens, d.context_dim), "weight")}
    c = d.context_dim
    for i in range(layers):
        _norm(lay, f"layers.{i}.0", c)
        _norm(lay, f"layers.{i}.1", c)
        _attention(lay, f"layers.{i}.2", c, c)
        _linear(lay, f"layers.{i}.3.0", 4 * c, c)
        _linear(lay, f"layers.{i}.3.2", c, 4 * c)
    return lay


def thresh_embedder_layout(d: Dims) -> Layout:
    """v1.5 ``thresh_embedder.*`` (ScalarEmbedder: sinusoid -> MLP)."""
    lay: Layout = {}
    _linear(lay, "embed_layer.0", d.context_dim, d.thresh_dim)
    _linear(lay, "embed_layer.2", d.context_dim, d.context_dim)
    return lay


def v2_unet_extras_layout(d: Dims) -> Layout:
    """v2 ``warp_modules.{0..11}`` (SelfTransformerBlock on the skip width) and ``style_modules.{0..11}``."""
    lay: Layout = {}
    _, skips = unet_input_layout(d)
    mc = d.model_channels
    out_widths = [mc * d.channel_mult[level] for level in reversed(range(len(d.channel_mult)))
                  for _ in range(d.num_res_blocks + 1)]
    for j, (skip, width) in enumerate(zip(reversed(skips), out_widths)):
        _norm(lay, f"warp_modules.{j}.norm1", skip)
        _norm(lay, f"warp_modules.{j}.norm2", skip)
        _attention(lay, f"warp_modules.{j}.attn", skip, skip)
        _linear(lay, f"warp_modules.{j}.ff.0", 4 * skip, skip)
        _linear(lay, f"warp_modules.{j}.ff.2", skip, 4 * skip)
        _norm(lay, f"style_modules.{j}.0", 2 * width)
        _linear(lay, f"style_modules.{j}.1", 2 * width, 4 * mc)
        _linear(lay, f"style_modules.{j}.2", 2 * width, 2 * width)
    return lay


def style_hint_width(d: Dims, width: int, downsample: bool) -> int:
    """Output width of the style encoder's zero layer after an input block of width ``width`` (method-enhance §2.2): ``2·C``,
    except after a downsample block, ``min(8·model_channels, 4·C)`` -- so that entry ``11 − i`` of the reversed
    hint list has the width ``2·ch`` of ``style_modules[11 − i]``."""
    return min(8 * d.model_channels, 4 * width) if downsample else 2 * width


def unet_encoder_layout(d: Dims, style: bool) -> Layout:
    """v2 ``bg_encoder`` / ``style_encoder`` (UNetEncoder: SD input half, label_emb(512), one zero layer per block;
    method-enhance §2.2)."""
    lay, skips = unet_input_layout(d)
    emb = 4 * d.model_channels
    _linear(lay, "label_emb.0.0", emb, 512)
    _linear(lay, "label_emb.0.2", emb, emb)
    for i, c in enumerate(skips):
        if style:
            downsample = f"input_blocks.{i}.0.op.weight" in lay
            _linear(lay, f"zero_layers.{i}", style_hint_width(d, c, downsample), c)
        else:
            _conv(lay, f"zero_layers.{i}", c, c, 1)
    return lay


def _prefixed(prefix: str, lay: Layout) -> Layout:
    return {prefix + k: v for k, v in lay.items()}


SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def schedule_buffers() -> Dict[str, torch.Tensor]:
    """LDM schedule buffers (method §1.1 scaled-linear schedule) as a checkpoint stores them (float32)."""
    return {k: v.float() for k, v in ldm_schedule_buffers().items()}


def released_layout(version: str = "v1", size: str = "tiny", context_dim: Optional[int] = None,
                    linear_proj: bool = False) -> Layout:
    """Full key -> (shape, kind) table of a released-style checkpoint (method §1.4 table)."""
    if version not in ("v1", "v1.5", "v2"):
        raise ValueError(f"version must be v1, v1.5 or v2, got {version!r}")
    d = dims_for(size, context_dim)
    if linear_proj:
        d = _replace(d, linear_proj=True)
    lay: Layout = {}
    lay.update(_prefixed(UNET_PREFIX, unet_layout(d)))
    lay.update(_prefixed(VAE_PREFIX, vae_layout(d)))
    lay.update(_prefixed(SKETCH_PREFIX, sketch_encoder_layout(d)))
    prefixes = transformer_prefixes(d)
    if version == "v1.5":
        lay.update(_prefixed(UNET_PREFIX, lora_layout(d, prefixes, bg_rank=None)))
        lay.update(_prefixed("transformer.", cluster_transformer_layout(d)))
        lay.update(_prefixed("thresh_embedder.", thresh_embedder_layout(d)))
    elif version == "v2":
        decoder_prefixes = [p for p in prefixes if p.startswith("output_blocks.")]
        lay.update(_prefixed(UNET_PREFIX, lora_layout(d, decoder_prefixes, bg_rank=4)))
        lay.update(_prefixed(UNET_PREFIX, v2_unet_extras_layout(d)))
        lay.update(_prefixed("bg_encoder.", unet_encoder_layout(d, style=False)))
        lay.update(_prefixed("style_encoder.", unet_encoder_layout(d, style=True)))
    for name in SCHEDULE_BUFFERS:
        lay[name] = ((1000,), f"buffer:{name}")
    return lay


# ---------------------------------------------------------------------------------------------------------------------
# Values and the streaming safetensors writer


def _key_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def random_tensor(key: str, shape: Sequence[int], kind: str, seed: int = 0) -> torch.Tensor:
    """Deterministic non-zero float32 tensor for ``key`` (see module docstring for the distributions)."""
    gen = torch.Generator().manual_seed(_key_seed(seed, key))
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    if kind == "norm":
        return 1.0 + 0.1 * noise
    if kind == "bias":
        return 0.02 * noise
    fan_in = max(1, math.prod(shape[1:]))
    return noise / math.sqrt(fan_in)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def write_safetensors(path: "str | os.PathLike[str]", entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                      make_tensor, metadata: Optional[Dict[str, str]] = None) -> None:
    """Stream a .safetensors file: ``entries`` = (key, shape, dtype); ``make_tensor(key)`` returns each tensor
    (any float dtype, cast here) only when it is written, so memory stays at one tensor."""
    header: Dict[str, object] = {}
    offset = 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape, dtype in entries:
            t = make_tensor(key).to(dtype)
            assert tuple(t.shape) == tuple(shape), (key, t.shape, shape)
            f.write(_tensor_bytes(t))
    os.replace(tmp, path)


def make_checkpoint(path: "str | os.PathLike[str]", version: str = "v1", size: str = "tiny", seed: int = 0,
                    dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float16,
                    context_dim: Optional[int] = None, linear_proj: bool = False,
                    overrides: Optional[Dict[str, torch.Tensor]] = None,
                    drop: Iterable[str] = ()) -> str:
    """Write a random ColorizeDiffusion checkpoint in the released key layout; returns the path.

    ``dtype``: everything except the VAE (released: fp32); ``vae_dtype``: ``first_stage_model.*`` (released: fp16).
    ``overrides`` replaces/adds tensors by full key (e.g. a wrongly shaped tensor); ``drop`` removes keys.
    """
    lay = released_layout(version, size, context_dim, linear_proj)
    buffers = schedule_buffers()
    overrides = dict(overrides or {})
    dropped = set(drop)
    entries = []
    for key, (shape, _kind) in lay.items():
        if key in dropped:
            continue
        if key in overrides:
            t = overrides[key]
            entries.append((key, tuple(t.shape), t.dtype))
            continue
        entries.append((key, shape, vae_dtype if key.startswith(VAE_PREFIX) else dtype))
    entries += [(k, tuple(t.shape), t.dtype) for k, t in overrides.items() if k not in lay]

    def make_tensor(key: str) -> torch.Tensor:
        return overrides[key] if key in overrides else layout_tensor(lay, buffers, key, seed)

    write_safetensors(path, entries, make_tensor, metadata={"format": "pt"})
    return os.fspath(path)


def sd_layout(sd_version: str = "sd2") -> Layout:
    """Small plain SD checkpoint: tiny U-Net (linear proj for sd2), VAE, and a text encoder under cond_stage_model."""
    if sd_version not in ("sd1", "sd2"):
        raise ValueError(f"sd_version must be 'sd1' or 'sd2', got {sd_version!r}")
    d = _replace(tiny_dims(64 if sd_version == "sd2" else 48), linear_proj=sd_version == "sd2")
    lay: Layout = {}
    lay.update(_prefixed(UNET_PREFIX, unet_layout(d)))
    lay.update(_prefixed(VAE_PREFIX, vae_layout(d)))
    width = d.context_dim
    if sd_version == "sd2":  # OpenCLIP text tower
        text = "cond_stage_model.model."
        lay[text + "token_embedding.weight"] = ((100, width), "weight")
        lay[text + "positional_embedding"] = ((77, width), "weight")
        _norm(lay, text + "ln_final", width)
        _linear(lay, text + "transformer.resblocks.0.attn.in_proj", 3 * width, width)
    else:  # HF CLIP text model
        text = "cond_stage_model.transformer.text_model."
        lay[text + "embeddings.token_embedding.weight"] = ((100, width), "weight")
        lay[text + "embeddings.position_embedding.weight"] = ((77, width), "weight")
        _norm(lay, text + "final_layer_norm", width)
    for name in SCHEDULE_BUFFERS:
        lay[name] = ((1000,), f"buffer:{name}")
    return lay


def make_sd_checkpoint(path: "str | os.PathLike[str]", sd_version: str = "sd2", seed: int = 0) -> str:
    """Write a small plain Stable Diffusion checkpoint (``cond_stage_model.*``, no ``control_encoder.*``)."""
    lay = sd_layout(sd_version)
    buffers = schedule_buffers()
    entries = [(k, shape, torch.float16 if k.startswith(VAE_PREFIX) else torch.float32)
               for k, (shape, _) in lay.items()]

    write_safetensors(path, entries, lambda key: layout_tensor(lay, buffers, key, seed), metadata={"format": "pt"})
    return os.fspath(path)


def layout_tensor(lay: Layout, buffers: Dict[str, torch.Tensor], key: str, seed: int) -> torch.Tensor:
    """The tensor of ``key`` in a layout: a schedule buffer, or seeded random values of its kind."""
    shape, kind = lay[key]
    if kind.startswith("buffer:"):
        return buffers[kind.split(":", 1)[1]]
    return random_tensor(key, shape, kind, seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_colorize.testing.checkpoints",
                                     description="Write a random ColorizeDiffusion checkpoint in the released layout.")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--version", default="v1", choices=["v1", "v1.5", "v2"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--context-dim", type=int, default=None,
                        help="cross-attention width (default 64 tiny, 1024 full)")
    args = parser.parse_args(argv)
    path = make_checkpoint(args.out, version=args.version, size=args.size, seed=args.seed,
                           dtype=getattr(torch, args.dtype), context_dim=args.context_dim)
    print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB, {args.version}, {args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
