"""Stand-in ``ldm.modules.diffusionmodules.openaimodel``: ``UNetModel`` and its blocks, SD 2.x path.

Module names, constructor arguments and the head rule are ldm's: with ``num_head_channels`` set a level of ``ch``
channels gets ``ch // num_head_channels`` heads of ``num_head_channels``; ``legacy=True`` then recomputes the head
width as ``ch // heads``. ``forward(x, timesteps=None, context=None, y=None, **kwargs)`` runs the plain loop (each
input block's output is pushed to the skip stack as it is) and concatenates skips with the module-level ``th.cat``,
which the webui swaps for a resizing ``cat`` (``sd_hijack_unet.TorchHijackForUnet``).
"""
from abc import abstractmethod

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, normalization,
                                               timestep_embedding, zero_module)
from ldm.util import exists


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """``x`` conditioned on ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Passes ``emb`` to the timestep blocks and ``context`` to the spatial transformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            extra = (emb,) if isinstance(layer, TimestepBlock) else \
                (context,) if isinstance(layer, SpatialTransformer) else ()
            x = layer(x, *extra)
        return x


class _Resample(nn.Module):
    """The attributes ldm's ``Upsample`` and ``Downsample`` share."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims


class Upsample(_Resample):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(_Resample):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, plus ``emb_layers(emb)`` per channel, GroupNorm-SiLU-Dropout-conv, plus the skip."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        if up or down or use_scale_shift_norm:
            raise NotImplementedError("stand-in ResBlock: SD 2.x path only (no up/down, no scale-shift norm)")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = False
        self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3,
                                                            padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        h = h + emb_out[(...,) + (None,) * (h.dim() - emb_out.dim())]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, use_bf16=False, num_heads=-1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1, context_dim=None,
                 n_embed=None, legacy=True, disable_self_attentions=None, num_attention_blocks=None,
                 disable_middle_self_attn=False, use_linear_in_transformer=False, adm_in_channels=None):
        super().__init__()
        if not use_spatial_transformer or num_classes is not None or resblock_updown or n_embed is not None:
            raise NotImplementedError("stand-in UNetModel: SD 2.x path only (spatial transformers, no classes)")
        assert context_dim is not None, "the spatial transformer needs context_dim"
        assert num_heads != -1 or num_head_channels != -1, "Either num_heads or num_head_channels has to be set"
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = (len(channel_mult) * [num_res_blocks] if isinstance(num_res_blocks, int)
                               else list(num_res_blocks))
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = th.bfloat16 if use_bf16 else th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.predict_codebook_ids = False

        def transformer(ch, disabled_sa):
            heads = ch // num_head_channels if num_head_channels != -1 else num_heads
            dim_head = num_head_channels if num_head_channels != -1 else ch // heads
            if legacy:
                dim_head = ch // heads
            return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                      disable_self_attn=disabled_sa, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def has_attention(level, index):
            return not exists(num_attention_blocks) or index < num_attention_blocks[level]

        def res_block(ch_in, ch_out=None):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and has_attention(level, nr):
                    layers.append(transformer(ch, disable_self_attentions[level] if disable_self_attentions
                                              else False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims,
                                                                            out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), transformer(ch, disable_middle_self_attn),
                                                    res_block(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and has_attention(level, i):
                    layers.append(transformer(ch, disable_self_attentions[level] if disable_self_attentions
                                              else False))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)  # the block's output as it is, also when a forward hook replaced it
        h = self.middle_block(h, emb, context)
        for module, skip in zip(self.output_blocks, reversed(skips)):
            h = module(th.cat([h, skip], dim=1), emb, context)
        return self.out(h.type(x.dtype))
