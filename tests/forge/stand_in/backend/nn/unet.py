"""Stand-in of Forge's ``backend/nn/unet.py``: ``IntegratedUNet2DConditionModel`` with Forge's construction
arguments, ldm module names, and Forge's call contract (forge-integration §5.2):

* ``forward(x, timesteps, context, y=None, control=None, transformer_options={})`` sets
  ``transformer_options["block"]`` to ``("input", i)`` / ``("middle", 0)`` / ``("output", i)``, runs the
  ``input_block_patch`` / ``output_block_patch`` entries, appends each input block's output to the skips as it is;
* a transformer block looks up ``patches_replace["attn1"|"attn2"]`` by ``(block, id, block_index)`` then
  ``(block, id)``; a replace patch gets the projected ``q, k, v`` and the module's ``to_out`` is applied after;
  otherwise it calls ``attn1(n, context=None, value=None, transformer_options=...)`` and
  ``attn2(n, context=context, value=None, transformer_options=...)``; ``attn2_output_patch`` runs after ``to_out``;
* ``CrossAttention.forward(x, context=None, value=None, mask=None, transformer_options={})`` projects, attends
  (``backend.attention.attention_function``) and applies ``to_out`` (``Linear`` + ``Dropout``).

The ResBlocks, feed-forward and resampling layers are lib_colorize's ldm-named ones.
"""
import torch
from torch import nn

from backend.attention import attention_function
from diffusers.configuration_utils import ConfigMixin, register_to_config
from lib_colorize.models.unet import (Downsample, FeedForward, ResBlock, TimestepBlock, Upsample,
                                      timestep_embedding)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        value = context if value is None else value
        return self.to_out(attention_function(self.to_q(x), self.to_k(context), self.to_v(value), self.heads, mask))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.n_heads, self.d_head = n_heads, d_head

    @staticmethod
    def _attend(attention, n, context, replace, keys, extra):
        patch = next((replace[k] for k in keys if k in replace), None)
        if patch is None:
            return attention(n, context=context, value=None, transformer_options=extra)
        source = n if context is None else context
        return attention.to_out(patch(attention.to_q(n), attention.to_k(source), attention.to_v(source), extra))

    def forward(self, x, context=None, transformer_options={}):
        extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=self.n_heads, dim_head=self.d_head)
        patches = transformer_options.get("patches", {})
        replace = transformer_options.get("patches_replace", {})
        block = transformer_options.get("block")
        keys = [(block[0], block[1], transformer_options.get("block_index", 0)), block] if block else []
        x = x + self._attend(self.attn1, self.norm1(x), None, replace.get("attn1", {}), keys, extra)
        n = self._attend(self.attn2, self.norm2(x), context, replace.get("attn2", {}), keys, extra)
        for patch in patches.get("attn2_output_patch", []):
            n = patch(n, extra)
        x = x + n
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.flatten(2).transpose(1, 2)
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for index, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = index
            hidden = block(hidden, context=context, transformer_options=transformer_options)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return x + hidden


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample) and output_shape is not None:
                # the next skip's size (odd latent sizes), as Forge's Upsample(x, output_shape)
                x = layer.conv(torch.nn.functional.interpolate(x, size=tuple(output_shape[2:]), mode="nearest"))
            else:
                x = layer(x)
        return x


class IntegratedUNet2DConditionModel(nn.Module, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, dropout=0, channel_mult=(1, 2, 4, 8),
                 num_heads=-1, num_head_channels=-1, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, use_linear_in_transformer=False, transformer_depth_middle=None,
                 transformer_depth_output=None, **unused):
        super().__init__()
        self.model_channels = model_channels
        emb = model_channels * 4
        depths, depths_out = list(transformer_depth), list(transformer_depth_output)

        def transformer(ch, depth):
            heads, dim = (num_heads, ch // num_heads) if num_head_channels == -1 else (ch // num_head_channels,
                                                                                      num_head_channels)
            return SpatialTransformer(ch, heads, dim, depth, context_dim, use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        ch, chans = model_channels, [model_channels]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers = [ResBlock(ch, emb, model_channels * mult)]
                ch = model_channels * mult
                depth = depths.pop(0)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb), transformer(ch, transformer_depth_middle),
                                                    ResBlock(ch, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                depth = depths_out.pop()
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        patches = transformer_options.get("patches", {})
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h, hs = x, []
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = module(h, emb, context, transformer_options)
            for patch in patches.get("input_block_patch", []):
                h = patch(h, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            skip = hs.pop()
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, transformer_options)
            h = module(torch.cat([h, skip], dim=1), emb, context, transformer_options, hs[-1].shape if hs else None)
        return self.out(h).type(x.dtype)
