"""Random XL checkpoints (``sdxl``, ``xlv2``) and reference-encoder weights in their released layouts (method-xl §1.5).

The key tables are written out here from the specification, independently of the model classes in
``lib_colorize.models`` (like :mod:`.checkpoints` for the SD2.1 models), so loading a generated file with
``strict=True`` checks the models against the released naming:

* ``model.diffusion_model.*``: the SDXL U-Net (sgm names; linear ``proj_in``/``proj_out``; transformer depths 2 and
  10 on levels 1 and 2, middle 10) with ``label_emb.0.0`` 512 wide;
* ``first_stage_model.*``: the SDXL KL-f8 VAE; ``control_encoder.*``: the multi-scale attention sketch encoder;
  ``proj.*``: ``ClusterConcat``; optionally the 12 schedule buffers;
* ``xlv2`` also: the background LoRA (rank 4) on the 70 ``attn2.to_{q,k,v}``, ``conv_fg`` and the ReferenceNet
  ``bg_encoder.*`` (in 6, ``label_emb`` 1024, no cross-attention, output blocks 0-6, no ``out``).

``size="full"`` has the released widths (parameter counts as in method-xl §1.4: 2,689,631,675 for ``sdxl``);
``size="tiny"`` keeps the block structure (70 transformer blocks, 4 residual levels) at small widths.
:func:`make_clip_bigg_weights` and :func:`make_tagger_weights` write random ViT-bigG-14 image-tower (open_clip or
transformers names) and WD-tagger (timm names) files. Tensors are streamed to disk one at a time.

Command line: ``python -m lib_colorize.testing.xl_checkpoints --out F --variant sdxl --size full --dtype float16``.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .checkpoints import (SCHEDULE_BUFFERS, Layout, _conv, _linear, _norm, _prefixed, _unet_resblock,
                          layout_tensor, unet_input_layout, random_tensor, schedule_buffers, vae_layout, write_safetensors)

UNET_PREFIX = "model.diffusion_model."
VARIANTS = ("sdxl", "xlv2")


@dataclass(frozen=True)
class XLDims:
    """Dimensions of a generated XL checkpoint (defaults: the released ones)."""

    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (1, 2)
    depths: Tuple[int, ...] = (1, 2, 10)
    middle_depth: int = 10
    context_dim: int = 2048
    adm: int = 512
    reference_net_adm: int = 1024
    vae_ch: int = 128
    vae_ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    sketch_stem: Tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)
    clip_dim: int = 1280
    wd_dim: int = 1024
    lora_rank: int = 4


FULL_XL = XLDims()
#: reduced widths with the released block structure: U-Net 32/64/128, context 64, CLIP 128 (one head of 128),
#: WD 128 (see :data:`TINY_TAGGER_ARCH`), VAE 32
TINY_XL = XLDims(model_channels=32, context_dim=64, vae_ch=32, sketch_stem=(8, 8, 8, 8, 16, 16, 16),
                 clip_dim=128, wd_dim=128)


def xl_dims(size: str) -> XLDims:
    if size == "full":
        return FULL_XL
    if size == "tiny":
        return TINY_XL
    raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")


def _attention(lay: Layout, p: str, c: int, c_ctx: int) -> None:
    _linear(lay, f"{p}.to_q", c, c, bias=False)
    _linear(lay, f"{p}.to_k", c, c_ctx, bias=False)
    _linear(lay, f"{p}.to_v", c, c_ctx, bias=False)
    _linear(lay, f"{p}.to_out.0", c, c)


def _transformer(lay: Layout, p: str, c: int, depth: int, ctx: Optional[int]) -> None:
    """sgm SpatialTransformer with linear projections; ``ctx`` None: no cross-attention (ReferenceNet)."""
    _norm(lay, f"{p}.norm", c)
    _linear(lay, f"{p}.proj_in", c, c)
    _linear(lay, f"{p}.proj_out", c, c)
    for k in range(depth):
        tb = f"{p}.transformer_blocks.{k}"
        _attention(lay, f"{tb}.attn1", c, c)
        _linear(lay, f"{tb}.ff.net.0.proj", 8 * c, c)
        _linear(lay, f"{tb}.ff.net.2", c, 4 * c)
        _norm(lay, f"{tb}.norm1", c)
        _norm(lay, f"{tb}.norm3", c)
        if ctx is not None:
            _attention(lay, f"{tb}.attn2", c, ctx)
            _norm(lay, f"{tb}.norm2", c)


def xl_unet_layout(d: XLDims, *, in_channels: int = 4, adm: Optional[int] = None, cross: bool = True,
                   output_blocks: Optional[int] = None, final_layer: bool = True) -> Layout:
    """SDXL U-Net keys without prefix (method-xl §1.5 table); the ReferenceNet with ``cross=False``,
    ``output_blocks=7``, ``final_layer=False``."""
    mc, emb = d.model_channels, 4 * d.model_channels
    ctx = d.context_dim if cross else None

    def transformer(lay_: Layout, prefix: str, channels: int, level: int) -> None:
        _transformer(lay_, prefix, channels, d.depths[level], ctx)

    lay, skips = unet_input_layout(d, transformer=transformer, in_channels=in_channels)
    _linear(lay, "label_emb.0.0", emb, d.adm if adm is None else adm)
    _linear(lay, "label_emb.0.2", emb, emb)
    c = skips[-1]
    _unet_resblock(lay, "middle_block.0", c, c, emb)
    _transformer(lay, "middle_block.1", c, d.middle_depth, ctx)
    _unet_resblock(lay, "middle_block.2", c, c, emb)
    n = 0
    for level in reversed(range(len(d.channel_mult))):
        for i in range(d.num_res_blocks + 1):
            if output_blocks is not None and n == output_blocks:
                break
            c_out = mc * d.channel_mult[level]
            _unet_resblock(lay, f"output_blocks.{n}.0", c + skips.pop(), c_out, emb)
            c = c_out
            if level in d.attention_levels:
                _transformer(lay, f"output_blocks.{n}.1", c, d.depths[level], ctx)
            if level and i == d.num_res_blocks:
                _conv(lay, f"output_blocks.{n}.{2 if level in d.attention_levels else 1}.conv", c, c, 3)
            n += 1
    if final_layer:
        _norm(lay, "out.0", c)
        _conv(lay, "out.2", 4, c, 3)
    return lay


def attn2_prefixes(d: XLDims) -> list:
    """``…attn2`` key prefixes of the 70 transformer blocks in DFS order (method-xl §2.4)."""
    lay = xl_unet_layout(d)
    order = []
    for key in lay:   # insertion order is the DFS order
        if key.endswith(".attn2.to_q.weight"):
            order.append(key[:-len(".to_q.weight")])
    return order


def background_lora_layout(d: XLDims) -> Layout:
    """xlv2's ``lora_{down,up}_background`` on every attn2 q/k/v (method-xl §1.5, §6.1) and ``conv_fg``."""
    lay: Layout = {}
    unet = xl_unet_layout(d)
    for p in attn2_prefixes(d):
        width = unet[f"{p}.to_q.weight"][0][0]
        for proj, c_in in (("to_q", width), ("to_k", d.context_dim), ("to_v", d.context_dim)):
            lay[f"{p}.{proj}.lora_down_background.weight"] = ((d.lora_rank, c_in), "weight")
            lay[f"{p}.{proj}.lora_up_background.weight"] = ((width, d.lora_rank), "weight")
    _conv(lay, "conv_fg", d.model_channels, 4, 3)
    return lay


def xl_sketch_encoder_layout(d: XLDims) -> Layout:
    """``MultiScaleAttentionEncoder`` keys without ``control_encoder.`` (method-xl §1.5)."""
    lay: Layout = {}
    levels = [d.model_channels * m for m in d.channel_mult]
    width = levels[-1]
    c = 3
    for index, c_out in zip(range(0, 16, 2), tuple(d.sketch_stem) + (levels[0],)):
        _conv(lay, f"model.{index}", c_out, c, 3)
        c = c_out
    previous = levels[0]
    for i, channels in enumerate(levels):
        _conv(lay, f"downsample_layers.{i}.1", channels, previous, 3)
        previous = channels
    for i, c_in in enumerate([levels[0]] + levels + [width]):
        _conv(lay, f"proj_ins.{i}", width, c_in, 1)
    for i, c_out in enumerate([levels[0]] + levels):
        _conv(lay, f"proj_outs.{i}", c_out, width, 1)
    for name in ("to_q", "to_k", "to_v"):
        _linear(lay, f"attn_layer.{name}", width, width, bias=False)
    _linear(lay, "attn_layer.to_out.0", width, width)
    lay["attn_layer.q_norm.weight"] = ((width,), "norm")
    lay["attn_layer.k_norm.weight"] = ((width,), "norm")
    return lay


def projector_layout(d: XLDims) -> Layout:
    """``ClusterConcat`` keys without ``proj.`` (method-xl §1.5, §3.4)."""
    lay: Layout = {}
    for name in ("to_q", "to_k", "to_v"):
        _linear(lay, f"attn.{name}", d.clip_dim, d.clip_dim, bias=False)
    _linear(lay, "attn.to_out.0", d.clip_dim, d.clip_dim)
    _norm(lay, "norm", d.clip_dim)
    _linear(lay, "proj.0", d.context_dim, d.clip_dim + d.wd_dim)
    _linear(lay, "proj.2", d.context_dim, d.context_dim)
    _norm(lay, "proj.3", d.context_dim)
    return lay


def xl_layout(variant: str = "sdxl", size: str = "tiny", schedule: bool = True) -> Layout:
    """Full key -> (shape, kind) table of a released-style XL checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    d = xl_dims(size)
    lay: Layout = {}
    lay.update(_prefixed(UNET_PREFIX, xl_unet_layout(d)))
    lay.update(_prefixed("first_stage_model.", vae_layout(d)))
    lay.update(_prefixed("control_encoder.", xl_sketch_encoder_layout(d)))
    lay.update(_prefixed("proj.", projector_layout(d)))
    if variant == "xlv2":
        lay.update(_prefixed(UNET_PREFIX, background_lora_layout(d)))
        lay.update(_prefixed("bg_encoder.", xl_unet_layout(d, in_channels=6, adm=d.reference_net_adm, cross=False,
                                                           output_blocks=7, final_layer=False)))
    if schedule:
        for name in SCHEDULE_BUFFERS:
            lay[name] = ((1000,), f"buffer:{name}")
    return lay


def layout_parameters(lay: Layout, prefix: str = "") -> int:
    return sum(math.prod(shape) for key, (shape, kind) in lay.items()
               if key.startswith(prefix) and not kind.startswith("buffer:"))


def make_xl_checkpoint(path: "str | os.PathLike[str]", variant: str = "sdxl", size: str = "tiny", seed: int = 0,
                       dtype: torch.dtype = torch.float32, schedule: bool = True,
                       overrides: Optional[Dict[str, torch.Tensor]] = None, drop: Sequence[str] = ()) -> str:
    """Write a random XL checkpoint in the released key layout (fp32 like the export tool, or ``dtype``)."""
    lay = xl_layout(variant, size, schedule)
    buffers = schedule_buffers()
    overrides = dict(overrides or {})
    dropped = set(drop)
    entries = [(k, tuple(overrides[k].shape) if k in overrides else shape,
                overrides[k].dtype if k in overrides else dtype)
               for k, (shape, _kind) in lay.items() if k not in dropped]
    entries += [(k, tuple(t.shape), t.dtype) for k, t in overrides.items() if k not in lay]

    def make_tensor(key: str) -> torch.Tensor:
        return overrides[key] if key in overrides else layout_tensor(lay, buffers, key, seed)

    write_safetensors(path, entries, make_tensor, metadata={"format": "pt"})
    return os.fspath(path)


# ------------------------------------------------------------------------------------ external weights
#: reduced ViT-bigG-14 geometry (224 px, patch 14 -> 257 tokens) with widths that fit :data:`TINY_XL`
TINY_BIGG_CONFIG = {"embed_dim": 128, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                                     "mlp_ratio": 2.0, "patch_size": 14}}
#: reduced tagger: 448 px, window 14, 4 stages -> 14 x 14 tokens of width 8·16 = 128 (:data:`TINY_XL`.wd_dim)
TINY_TAGGER_ARCH = {"model_name": None, "img_size": 448, "window_size": 14, "embed_dim": 16, "depths": (1, 1, 1, 1),
                    "num_heads": (1, 1, 2, 2), "num_classes": 12, "global_pool": "avg", "act_layer": "gelu"}


TINY_BIGG_NAME = "cd-tiny-bigg"


def register_tiny_bigg() -> str:
    """Register :data:`TINY_BIGG_CONFIG` as the open_clip architecture ``cd-tiny-bigg`` (for ``--clip-arch``)."""
    from .clip import register_tiny_clip

    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
    return register_tiny_clip(TINY_BIGG_NAME, {**TINY_BIGG_CONFIG, "text_cfg": text})


def _kind(key: str, shape: Sequence[int]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) >= 2 or leaf in ("class_embedding",):
        return "weight"
    if leaf == "weight" and ("norm" in key or "ln_" in key or "layer_norm" in key or "layrnorm" in key):
        return "norm"
    return "bias"


def _state_layout(shapes: Dict[str, Tuple[int, ...]]) -> Layout:
    return {k: (tuple(s), _kind(k, s)) for k, s in shapes.items()}


def _write_random(path, lay: Layout, seed: int, dtype: torch.dtype, special=None) -> str:
    special = special or {}

    def make_tensor(key: str) -> torch.Tensor:
        if key in special:
            return special[key]
        shape, kind = lay[key]
        return random_tensor(key, shape, kind, seed)

    write_safetensors(path, [(k, shape, dtype) for k, (shape, _) in lay.items()], make_tensor,
                      metadata={"format": "pt"})
    return os.fspath(path)


def clip_bigg_shapes(config: Optional[dict] = None) -> Dict[str, Tuple[int, ...]]:
    """open_clip ``visual.*`` names and shapes of the ViT-bigG-14 image tower (or ``config``'s)."""
    from ..models.clip_xl import build_vision_tower

    tower = build_vision_tower(config)
    return {f"visual.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}


def hf_clip_shapes(config: Optional[dict] = None) -> Dict[str, Tuple[int, ...]]:
    """transformers ``CLIPVisionModelWithProjection`` names and shapes of the same tower (method-xl §1.5)."""
    from ..models.clip_xl import bigg_config

    config = bigg_config() if config is None else config
    v = config["vision_cfg"]
    width, layers, patch = int(v["width"]), int(v["layers"]), int(v["patch_size"])
    mlp = int(width * float(v.get("mlp_ratio", 4.0)))
    tokens = (int(v["image_size"]) // patch) ** 2 + 1
    out: Dict[str, Tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (width,),
        "vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": (tokens, width),
        "vision_model.pre_layrnorm.weight": (width,), "vision_model.pre_layrnorm.bias": (width,),
        "vision_model.post_layernorm.weight": (width,), "vision_model.post_layernorm.bias": (width,),
        "visual_projection.weight": (int(config["embed_dim"]), width),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{proj}.weight"] = (width, width)
            out[f"{p}.self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{p}.{norm}.weight"] = (width,)
            out[f"{p}.{norm}.bias"] = (width,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (mlp, width), (mlp,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (width, mlp), (width,)
    return out


def make_clip_bigg_weights(path: "str | os.PathLike[str]", size: str = "tiny", seed: int = 0,
                           dtype: torch.dtype = torch.float32, hf_format: bool = False) -> str:
    """Random image-tower weights of ViT-bigG-14 (``size="full"``) or :data:`TINY_BIGG_CONFIG`, in open_clip
    (``visual.*``) or transformers (``vision_model.*``, ``hf_format``) names."""
    config = None if size == "full" else TINY_BIGG_CONFIG
    shapes = hf_clip_shapes(config) if hf_format else clip_bigg_shapes(config)
    return _write_random(path, _state_layout(shapes), seed, dtype)


def tagger_shapes(arch: Optional[dict] = None) -> Dict[str, Tuple[int, ...]]:
    """timm names and shapes of the WD tagger (``arch``: :data:`~lib_colorize.models.tagger.WD_TAGGER_ARCH`)."""
    from ..models.tagger import build_tagger

    return {k: tuple(v.shape) for k, v in build_tagger(arch).state_dict().items()
            if not k.endswith(("relative_coords_table", "relative_position_index", "attn_mask", "k_bias"))}


def make_tagger_weights(path: "str | os.PathLike[str]", size: str = "tiny", seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> str:
    """Random WD-tagger weights (full: swinv2_base_window8_256 at 448 px; tiny: :data:`TINY_TAGGER_ARCH`)."""
    shapes = tagger_shapes(None if size == "full" else TINY_TAGGER_ARCH)
    lay = _state_layout(shapes)
    # SwinV2's attention temperature: log(10) as timm initialises it (a random one would saturate the softmax)
    special = {k: torch.full(shape, math.log(10.0)) for k, (shape, _) in lay.items() if k.endswith("logit_scale")}
    return _write_random(path, lay, seed, dtype, special)


def make_xl_encoder_weights(folder: "str | os.PathLike[str]", size: str = "tiny", seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Dict[str, str]:
    """Random CLIP ViT-bigG-14 and WD-tagger files under the names the extension looks for
    (:data:`lib_colorize.weights.XL_WEIGHT_FILES`) in ``folder``."""
    from ..weights import CLIP_BIGG, WD_TAGGER

    os.makedirs(folder, exist_ok=True)
    return {"clip": make_clip_bigg_weights(os.path.join(folder, CLIP_BIGG.filename), size, seed, dtype),
            "tagger": make_tagger_weights(os.path.join(folder, WD_TAGGER.filename), size, seed + 1, dtype)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_colorize.testing.xl_checkpoints",
                                     description="Write random XL weights in the released layouts.")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--what", default="checkpoint", choices=["checkpoint", "clip", "clip-hf", "tagger"])
    parser.add_argument("--variant", default="sdxl", choices=list(VARIANTS))
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.what == "checkpoint":
        path = make_xl_checkpoint(args.out, args.variant, args.size, args.seed, dtype)
    elif args.what == "tagger":
        path = make_tagger_weights(args.out, args.size, args.seed, dtype)
    else:
        path = make_clip_bigg_weights(args.out, args.size, args.seed, dtype, hf_format=args.what == "clip-hf")
    print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
