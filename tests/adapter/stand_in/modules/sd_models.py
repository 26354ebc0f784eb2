"""Stand-in ``modules.sd_models``: loads a checkpoint into an ldm-like ``LatentDiffusion`` stand-in.

The U-Net is ldm's ``openaimodel.UNetModel`` (the stand-in ``ldm`` package) built from the ``unet_config`` of the
YAML that ``sd_models_config.find_checkpoint_config`` picks, as in the webui (so the extension's config resolver
and its YAML are exercised: a wrong ``use_linear_in_transformer`` fails to load). The tests' checkpoints are
scaled-down SD 2.x models, so the config's widths are scaled to the file: ``model_channels`` and ``context_dim``
from the tensors, ``num_head_channels`` at most ``model_channels`` (the narrowest level then has one head). The
U-Net tensors must all be there (others are ignored, like the webui's non-strict load). The VAE is
``lib_colorize``'s ldm-named ``AutoencoderKL``. After loading, ``sd_hijack.model_hijack.hijack`` applies the
cross-attention optimisation, then ``on_model_loaded`` callbacks fire.

A config whose model is sgm's ``DiffusionEngine`` (the extension's XL YAML) gives a :class:`StandInDiffusionEngine`
as the webui builds one for SDXL: the conditioner the YAML names (instantiated from it), the SDXL U-Net
(``lib_colorize``'s, which the real-webui tests check against sgm's) behind an ``OpenAIWrapper`` that passes
``cond["crossattn"]`` as ``context`` and ``cond["vector"]`` as ``y``, the VAE with its scale inside
``encode_first_stage``, ``is_sdxl`` and the parameterization from the denoiser's scaling class (``extend_sdxl``).
"""
import os
import zlib

import torch
from torch import nn

from ldm.util import instantiate_from_config
from modules import script_callbacks, sd_hijack, sd_models_config, shared

UNET_PREFIX = "model.diffusion_model."

# ldm's stock SD 2.x v2-inference.yaml unet_config, for a file whose config is not on disk
SD2_UNET_CONFIG = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {"use_checkpoint": True, "use_fp16": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
               "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
               "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
               "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False},
}


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

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        """``crossattn`` conditioning: the context is ``cat(c_crossattn, 1)``; ``c_concat`` is not used."""
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class StandInLatentDiffusion(nn.Module):
    """``apply_model(x, t, cond)`` -> ``self.model(x, t, **cond)`` (ldm's ``LatentDiffusion.apply_model`` with a
    condition dict)."""

    def __init__(self, unet, vae, parameterization="eps", alphas_cumprod=None, context_dim=1024):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = vae
        self.parameterization = parameterization
        self.scale_factor = 0.18215
        self.cond_stage_key = "txt"
        self.is_sd2 = True
        self.is_sdxl = False
        self.context_dim = context_dim
        self.lowvram = False
        self.linear_start, self.linear_end = 0.00085, 0.012
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())
        # the (unused) text encoder: random like memory the webui leaves uninitialised when a file lacks it
        self.cond_stage_model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8))
        self.apply_calls = 0

    def apply_model(self, x, t, cond):
        self.apply_calls += 1
        return self.model(x, t, **cond)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior):
        return self.scale_factor * posterior.mean

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, prompts):
        """Deterministic stand-in text encoder: one (77, D) tensor per prompt."""
        rows = [torch.randn(77, self.context_dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows)


class OpenAIWrapper(nn.Module):
    """sgm's ``OpenAIWrapper``: ``diffusion_model(cat(x, c["concat"]), timesteps=t, context=c["crossattn"],
    y=c["vector"])``."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, t, c.get("crossattn"), c.get("vector"))


class StandInDiffusionEngine(nn.Module):
    """sgm's ``DiffusionEngine`` as the webui extends it for SDXL (see the module docstring)."""

    def __init__(self, unet, vae, conditioner, parameterization, scale_factor):
        from lib_colorize.schedule import ldm_schedule_buffers

        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.first_stage_model = vae
        self.conditioner = conditioner
        self.cond_stage_model = conditioner            # sd_hijack: an SDXL conditioner becomes cond_stage_model
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.cond_stage_key = "txt"
        self.is_sdxl, self.is_sd2, self.is_sdxl_inpaint = True, False, False
        self.lowvram = False
        self.register_buffer("alphas_cumprod", ldm_schedule_buffers()["alphas_cumprod"].float())
        self.apply_calls = 0

    def apply_model(self, x, t, cond):
        self.apply_calls += 1
        return self.model(x, t, cond)

    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    def get_first_stage_encoding(self, x):
        return x

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, prompts):
        return self.conditioner({"txt": list(prompts)})


def _load_diffusion_engine(path, config, info):
    from lib_colorize.checkpoint import load_checkpoint

    params = config["model"]["params"]
    loaded = load_checkpoint(path, components=("unet", "vae"))
    conditioner = instantiate_from_config(params["conditioner_config"])
    if hasattr(conditioner, "context_dim"):   # widths scaled to the file, as for the U-Net of SD 2.x configs
        conditioner.context_dim = loaded.unet.config.context_dim
    scaling = params["denoiser_config"]["params"]["scaling_config"]["target"]
    return StandInDiffusionEngine(loaded.unet, loaded.vae, conditioner, "v" if scaling.endswith("VScaling") else "eps",
                                  float(params.get("scale_factor", 1.0)))


def _read_config(config_path):
    if config_path and os.path.isfile(config_path):
        import yaml

        with open(config_path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    return {}


def unet_config_for(config, shapes):
    """The config's ``unet_config`` (or SD 2.x's) with its widths scaled to the file's U-Net ``shapes``."""
    node = ((config.get("model") or {}).get("params") or {}).get("unet_config") or SD2_UNET_CONFIG
    params = dict(node["params"])
    params["model_channels"] = int(shapes[UNET_PREFIX + "input_blocks.0.0.weight"][0])
    context_key = next(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight"))
    params["context_dim"] = int(shapes[context_key][1])
    if params.get("num_head_channels", -1) > 0:
        params["num_head_channels"] = min(params["num_head_channels"], params["model_channels"])
    return {"target": node["target"], "params": params}


def load_model(path, fire_callbacks=True):
    """Load ``path`` like the webui would and make it ``shared.sd_model``."""
    from lib_colorize.checkpoint import load_checkpoint
    from safetensors import safe_open

    info = CheckpointInfo(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        alphas = f.get_tensor("alphas_cumprod") if "alphas_cumprod" in keys else None
        unet_state = {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in keys if k.startswith(UNET_PREFIX)}
        text_state = {k[len("cond_stage_model."):]: f.get_tensor(k) for k in keys if k.startswith("cond_stage_model.")}
    config_path = sd_models_config.find_checkpoint_config(dict.fromkeys(keys), info)
    config = _read_config(config_path)
    if str((config.get("model") or {}).get("target", "")).endswith("DiffusionEngine"):
        return _finish(_load_diffusion_engine(path, config, info), info, config_path, fire_callbacks)
    unet_config = unet_config_for(config, shapes)
    unet = instantiate_from_config(unet_config)
    missing, _unexpected = unet.load_state_dict(unet_state, strict=False)
    if missing:
        raise RuntimeError(f"Error(s) in loading state_dict for UNetModel: missing keys {missing[:5]}...")
    vae = load_checkpoint(path, components=("vae",)).vae
    if alphas is None:
        alphas = torch.zeros(1000)  # what meta-device loading leaves for a file without schedule buffers
    parameterization = ((config.get("model") or {}).get("params") or {}).get("parameterization", "eps")
    model = StandInLatentDiffusion(unet, vae, parameterization, alphas, unet_config["params"]["context_dim"])
    if text_state:
        model.cond_stage_model.load_state_dict(text_state)
    return _finish(model, info, config_path, fire_callbacks)


def _finish(model, info, config_path, fire_callbacks):
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.used_config = config_path
    model.eval().requires_grad_(False)
    shared.sd_model = model
    sd_hijack.model_hijack.hijack(model)
    if fire_callbacks:
        script_callbacks.model_loaded_callback(model)
    return model


class _ModelData:
    sd_model = None


model_data = _ModelData()
