"""Stand-in ``modules.sd_models``: loads a checkpoint into a small ldm-like ``LatentDiffusion`` stand-in.

The U-Net and VAE are ``lib_colorize``'s ldm-named modules (the real webui builds ldm's); the config is chosen
through ``sd_models_config.find_checkpoint_config`` as in the webui (so the extension's resolver is exercised),
the parameterization comes from that YAML, and ``on_model_loaded`` callbacks fire after loading.
"""
import os
import zlib

import torch
from torch import nn

from modules import script_callbacks, sd_models_config, shared


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = os.path.abspath(filename)
        self.name = os.path.basename(filename)
        self.title = self.name
        self.model_name = os.path.splitext(self.name)[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"


class StandInLatentDiffusion(nn.Module):
    """``apply_model(x, t, cond)`` -> ``diffusion_model(x, t, context=cat(c_crossattn, 1))`` (``c_concat`` is
    ignored, as ldm's ``crossattn`` conditioning does)."""

    def __init__(self, unet, vae, parameterization="eps", alphas_cumprod=None):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = vae
        self.parameterization = parameterization
        self.scale_factor = 0.18215
        self.cond_stage_key = "txt"
        self.is_sd2 = True
        self.lowvram = False
        self.linear_start, self.linear_end = 0.00085, 0.012
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())
        # the (unused) text encoder: random like memory the webui leaves uninitialised when a file lacks it
        self.cond_stage_model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8))
        self.apply_calls = 0

    def apply_model(self, x, t, cond):
        self.apply_calls += 1
        context = torch.cat(cond["c_crossattn"], 1)
        return self.model.diffusion_model(x, t, context=context)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior):
        return self.scale_factor * posterior.mean

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, prompts):
        """Deterministic stand-in text encoder: one (77, D) tensor per prompt."""
        dim = self.model.diffusion_model.config.context_dim
        rows = [torch.randn(77, dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows)


def _parameterization(config_path):
    if config_path and os.path.isfile(config_path):
        import yaml

        with open(config_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        return config["model"]["params"].get("parameterization", "eps")
    return "eps"


def load_model(path, fire_callbacks=True):
    """Load ``path`` like the webui would and make it ``shared.sd_model``."""
    from lib_colorize.checkpoint import load_checkpoint
    from safetensors import safe_open

    info = CheckpointInfo(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        alphas = f.get_tensor("alphas_cumprod") if "alphas_cumprod" in keys else None
    config = sd_models_config.find_checkpoint_config(dict.fromkeys(keys), info)
    loaded = load_checkpoint(path, components=("unet", "vae"))
    if alphas is None:
        alphas = torch.zeros(1000)  # what meta-device loading leaves for a file without schedule buffers
    model = StandInLatentDiffusion(loaded.unet, loaded.vae, _parameterization(config),
                                   alphas)
    text_keys = {k[len("cond_stage_model."):]: k for k in keys if k.startswith("cond_stage_model.")}
    if text_keys:
        with safe_open(path, framework="pt") as f:
            model.cond_stage_model.load_state_dict({k: f.get_tensor(v) for k, v in text_keys.items()})
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.used_config = config
    model.eval().requires_grad_(False)
    shared.sd_model = model
    if fire_callbacks:
        script_callbacks.model_loaded_callback(model)
    return model


class _ModelData:
    sd_model = None


model_data = _ModelData()
