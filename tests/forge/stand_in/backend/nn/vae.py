"""Stand-in of Forge's ``backend/nn/vae.py``: ``IntegratedAutoencoderKL`` built from a diffusers-style config, with
ldm module names (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``), ``encode(x, regulation)`` and the
latent scaling of ``process_in`` / ``process_out``. The blocks are lib_colorize's ldm-named ones."""
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from lib_colorize.models.vae import AutoencoderKL, VAEConfig


class IntegratedAutoencoderKL(nn.Module, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1, act_fn="silu",
                 latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=0.0,
                 latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True,
                 use_post_quant_conv=True):
        super().__init__()
        ch = block_out_channels[0]
        inner = AutoencoderKL(VAEConfig(in_channels=in_channels, out_channels=out_channels, ch=ch,
                                        ch_mult=tuple(c // ch for c in block_out_channels),
                                        num_res_blocks=layers_per_block, z_channels=latent_channels,
                                        embed_dim=latent_channels))
        self.encoder, self.decoder = inner.encoder, inner.decoder
        self.quant_conv, self.post_quant_conv = inner.quant_conv, inner.post_quant_conv
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor or 0.0

    def encode(self, x, regulation=None):
        posterior = AutoencoderKL.encode(self, x)
        return regulation(posterior) if regulation is not None else posterior.sample()

    def decode(self, z):
        return AutoencoderKL.decode(self, z)

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor
