"""ColorizeDiffusion checkpoints in Forge 2: discovery, the checkpoint-list guard, and our own models.

Forge 2 cannot load a ColorizeDiffusion file as its main model (its conv ``proj_in`` matches no model class, and the
file has no text encoder: forge-integration §4.2). So the extension owns the model (§4.4 option A):

* **our U-Net** -- Forge's own ``IntegratedUNet2DConditionModel`` with the file's dimensions (conv projections),
  built under ``using_forge_operations`` with Forge's dtype and device choice and wrapped in a ``UnetPatcher``
  with the file's prediction type (eps / v). Each sampling pass puts a clone of it into
  ``p.sd_model.forge_objects.unet``; Forge's memory manager loads it for sampling like its own, and we take the
  host's U-Net off the GPU first (:func:`offload_host_unet`), so the two never sit in VRAM together;
* **our VAE** -- the file's ``first_stage_model.*`` in Forge's ``IntegratedAutoencoderKL`` and ``VAE`` wrapper; it
  encodes img2img init images and the injection reference and decodes the results, one image at a time;
* **the sketch encoder** (and the OpenCLIP towers of :mod:`cd_webui.model`) -- handed to Forge's memory manager
  whenever they run (:func:`forge_placement`).

The webui's checkpoint (an SD 1.x or 2.x model) stays loaded as the **host**: Forge's sampler takes its noise
schedule (sigmas) from it, which must equal ours (:func:`require_host`). Its U-Net, VAE and text encoder do nothing
for a ColorizeDiffusion generation.

**Checkpoint-list guard.** Choosing a ColorizeDiffusion file in Forge's own checkpoint list (UI, or the API's
``override_settings``) would otherwise unload the host and then fail to load the file, leaving the server without a
model (forge-integration §9.6). :func:`install_checkpoint_guard` wraps ``sd_models.select_checkpoint`` so that Forge
keeps (or picks) a host checkpoint instead; the chosen ColorizeDiffusion file is then the accordion's "Automatic"
choice (:func:`resolve_checkpoint`).

ColorizeDiffusion files are found in Forge's checkpoint list (``models/Stable-diffusion``) and in the extension's
models folder (:func:`cd_webui.model.models_dir`), by their safetensors header (``control_encoder.*`` keys).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lib_colorize.errors import CheckpointError, ColorizeError, InvalidInput, NotColorizeModel

logger = logging.getLogger(__name__)

AUTOMATIC = "Automatic"
#: Infotext key of the ColorizeDiffusion checkpoint (Forge's own "Model" is the host's).
INFOTEXT_CHECKPOINT = "CD checkpoint"
#: Host engines that can serve: SD 1.x and 2.x share our noise schedule; the others' conditioning, VAE and
#: schedule differ.
HOST_FLAGS = ("is_sd1", "is_sd2")

_lock = threading.RLock()


# --------------------------------------------------------------------------------------------------- discovery
def file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


_header_cache: dict = {}


def is_colorize_file(path: Optional[str]) -> bool:
    """Whether ``path`` is a ColorizeDiffusion checkpoint (safetensors with U-Net and ``control_encoder.*`` keys;
    pickles are not opened, so they never count). Cached by file key."""
    from lib_colorize.checkpoint import is_colorize_checkpoint, read_safetensors_header

    if not path or not str(path).lower().endswith(".safetensors") or not os.path.isfile(path):
        return False
    try:
        key = file_key(path)
    except OSError:
        return False
    with _lock:
        if key in _header_cache:
            return _header_cache[key]
    try:
        result = is_colorize_checkpoint(read_safetensors_header(path))
    except CheckpointError:
        result = False
    with _lock:
        _header_cache[key] = result
    return result


def checkpoint_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _candidate_files() -> list:
    from modules import sd_models

    from cd_webui.model import models_dir

    files = [info.filename for info in list(sd_models.checkpoints_list.values())]
    folder = models_dir()
    if os.path.isdir(folder):
        files += [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    seen, unique = set(), []
    for path in files:
        real = os.path.abspath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def colorize_checkpoints() -> dict:
    """``{name: path}`` of every ColorizeDiffusion file (name = file name without extension)."""
    found: dict = {}
    for path in _candidate_files():
        if is_colorize_file(path):
            found.setdefault(checkpoint_name(path), path)
    return found


def webui_choice() -> Optional[str]:
    """The ColorizeDiffusion file chosen in Forge's own checkpoint list (kept from loading by the guard), if any."""
    from modules import sd_models, shared

    name = getattr(shared.opts, "sd_model_checkpoint", None)
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    path = getattr(info, "filename", None)
    return path if is_colorize_file(path) else None


def resolve_checkpoint(choice: Any) -> str:
    """The file of the accordion's / API's ``checkpoint`` choice.

    The name of a ColorizeDiffusion file found (:func:`colorize_checkpoints`; with or without extension, or Forge's
    title ``name.safetensors [hash]``; never a path, which would let API clients open any file); ``Automatic`` (or
    empty): the file chosen in Forge's checkpoint list, else the only one there is.
    """
    available = colorize_checkpoints()
    listing = ", ".join(sorted(available)) or "none"
    text = "" if choice is None else str(choice).strip()
    if text and text != AUTOMATIC:
        stem = checkpoint_name(text.split(" [")[0])
        if stem in available:
            return available[stem]
        raise InvalidInput("checkpoint", f"no ColorizeDiffusion checkpoint named {text!r}; available: {listing}")
    chosen = webui_choice()
    if chosen is not None:
        return chosen
    if len(available) == 1:
        return next(iter(available.values()))
    if not available:
        raise NotColorizeModel("ColorizeDiffusion: no ColorizeDiffusion checkpoint found. Put one "
                               "(mult-*.safetensors, switch-eps.safetensors, v2-full.safetensors) into "
                               "models/Stable-diffusion or models/ColorizeDiffusion")
    raise InvalidInput("checkpoint", f"several ColorizeDiffusion checkpoints are available ({listing}); choose "
                                     "one in the accordion (API key 'checkpoint')")


# ------------------------------------------------------------------------------------------------ the guard
def _host_fallback():
    """A checkpoint Forge can load to host the generation: the loaded one, else the first other file listed."""
    from modules import sd_models

    loaded = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    info = getattr(loaded, "sd_checkpoint_info", None)
    if info is not None and not is_colorize_file(info.filename):
        return info
    for info in list(sd_models.checkpoints_list.values()):
        if not is_colorize_file(info.filename):
            return info
    return None


def _guarded(original):
    def select_checkpoint():
        info = original()
        if info is None or not is_colorize_file(getattr(info, "filename", None)):
            return info
        host = _host_fallback()
        if host is None:
            print(f"ColorizeDiffusion: {info.name} is a ColorizeDiffusion checkpoint, which Forge cannot load as "
                  "its main model, and there is no other checkpoint to host it: add an SD 1.x or 2.x checkpoint "
                  "to models/Stable-diffusion")
            return info
        print(f"ColorizeDiffusion: {info.name} is a ColorizeDiffusion checkpoint, which Forge cannot load as its "
              f"main model; {host.name} stays loaded as the host, and ColorizeDiffusion runs {info.name} when "
              "enabled")
        return host

    select_checkpoint.colorize_original = original
    return select_checkpoint


def install_checkpoint_guard() -> None:
    """Wrap ``sd_models.select_checkpoint`` (idempotent) and fix loading parameters chosen before the extension
    was imported (a ColorizeDiffusion file saved as the selected checkpoint)."""
    from modules import sd_models

    current = sd_models.select_checkpoint
    original = getattr(current, "colorize_original", current)
    sd_models.select_checkpoint = _guarded(original)
    params = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None)
    if isinstance(params, dict) and is_colorize_file(getattr(params.get("checkpoint_info"), "filename", None)):
        host = _host_fallback()
        if host is not None:
            params["checkpoint_info"] = host


def uninstall_checkpoint_guard() -> None:
    from modules import sd_models

    original = getattr(sd_models.select_checkpoint, "colorize_original", None)
    if original is not None:
        sd_models.select_checkpoint = original


# --------------------------------------------------------------------------------------------------- the host
def require_host(sd_model, colorize: "ColorizeModel") -> None:
    """Refuse a host whose noise schedule (or model family) differs from the ColorizeDiffusion model's."""
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name", None) or "the loaded checkpoint"
    if sd_model is None or not any(getattr(sd_model, flag, False) for flag in HOST_FLAGS):
        raise NotColorizeModel(f"ColorizeDiffusion in Forge needs an SD 1.x or 2.x checkpoint as the webui's "
                               f"model (it hosts the generation: Forge samples with its noise schedule); {name} is "
                               "another kind of model. Choose an SD 1.x or 2.x checkpoint")
    host = sd_model.forge_objects_after_applying_lora.unet.model.predictor.sigmas.float().cpu()
    ours = colorize.unet.model.predictor.sigmas.float().cpu()
    if host.shape != ours.shape or not torch.allclose(host, ours, rtol=1e-4, atol=1e-6):
        raise NotColorizeModel(f"ColorizeDiffusion: the noise schedule of {name} differs from the ColorizeDiffusion "
                               "model's (SD scaled-linear, 1000 steps); choose a standard SD 1.x or 2.x checkpoint "
                               "(and no Zero Terminal SNR schedule)")


def offload_host_unet(host_unet) -> None:
    """Take the host's U-Net (and its clones) off the GPU through Forge's memory manager, so that it does not sit
    in VRAM beside ours while we sample."""
    from backend import memory_management

    loaded = memory_management.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        entry = loaded[index]
        if getattr(entry.model, "model", None) is host_unet.model and entry.device.type != "cpu":
            loaded.pop(index).model_unload()


# ------------------------------------------------------------------------------------------- memory placement
_patchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _patcher_of(module: torch.nn.Module):
    from backend import memory_management
    from backend.patcher.base import ModelPatcher

    patcher = _patchers.get(module)
    if patcher is None:
        patcher = ModelPatcher(module, load_device=memory_management.get_torch_device(),
                               offload_device=memory_management.cpu)
        _patchers[module] = patcher
    return patcher


def _unload(patcher) -> None:
    from backend import memory_management

    loaded = memory_management.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        if loaded[index].model is patcher:
            loaded.pop(index).model_unload()


@contextlib.contextmanager
def forge_placement(module: torch.nn.Module, offload: bool):
    """``cd_webui.model.placement`` in Forge: the module is loaded by Forge's memory manager (which frees other
    models as needed) while it runs, and unloaded afterwards when ``offload``."""
    from backend import memory_management

    patcher = _patcher_of(module)
    memory_management.load_model_gpu(patcher)
    try:
        yield module
    finally:
        if offload and memory_management.get_torch_device().type != "cpu":
            _unload(patcher)


# ---------------------------------------------------------------------------------------------- our models
@dataclass
class ColorizeModel:
    """The models of one ColorizeDiffusion file in Forge (cached by file key, one file at a time)."""

    path: str
    key: tuple
    parameterization: str
    unet: Any                   # backend.patcher.unet.UnetPatcher: clone it per pass
    vae: Any                    # backend.patcher.vae.VAE
    sketch_encoder: torch.nn.Module
    info: Any = None            # lib_colorize.checkpoint.CheckpointInfo of the file (version, family)

    @property
    def name(self) -> str:
        return checkpoint_name(self.path)

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self.unet.model.diffusion_model

    @property
    def computation_dtype(self) -> torch.dtype:
        return self.unet.model.computation_dtype

    @property
    def predictor(self):
        return self.unet.model.predictor

    def owns(self, patcher) -> bool:
        """Whether a U-Net patcher is ours or a clone of ours."""
        return getattr(patcher, "model", None) is self.unet.model

    def encode_posterior(self, image: torch.Tensor):
        """NCHW [-1, 1] -> the VAE's posterior (its ``mean`` and ``std`` seed the injection latent)."""
        from backend import memory_management

        vae = self.vae
        memory_management.load_model_gpu(vae.patcher)
        model = vae.first_stage_model
        return model.encode(image.to(device=vae.device, dtype=vae.vae_dtype), regulation=lambda posterior: posterior)


def forge_unet_config(config) -> dict:
    """Forge's ``IntegratedUNet2DConditionModel`` arguments for a :class:`lib_colorize.models.unet.UNetConfig`."""
    levels = range(len(config.channel_mult))
    depth = config.transformer_depth

    def per_block(blocks: int) -> list:
        return [depth if level in config.attention_levels else 0 for level in levels for _ in range(blocks)]

    # one head of the block's full width here; set_attention_heads gives each block its heads afterwards
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                model_channels=config.model_channels, num_res_blocks=[config.num_res_blocks] * len(levels),
                channel_mult=list(config.channel_mult), num_heads=1, num_head_channels=-1,
                use_spatial_transformer=True, transformer_depth=per_block(config.num_res_blocks),
                transformer_depth_output=per_block(config.num_res_blocks + 1), transformer_depth_middle=depth,
                context_dim=config.context_dim, use_linear_in_transformer=config.use_linear_proj)


def set_attention_heads(unet: torch.nn.Module, head_channels: int) -> None:
    """Heads of every transformer block by the SD 2.x rule (``C / head_channels``, at least one: method §4.1), as
    :func:`lib_colorize.models.unet.num_heads_for` counts them. Forge's constructor takes one head count or one head
    width for the whole U-Net; the weights' shapes do not depend on it."""
    from lib_colorize.models.unet import num_heads_for
    from lib_colorize.processors import transformer_blocks

    for block in transformer_blocks(unet):
        width = int(block.attn1.to_q.weight.shape[0])
        heads = num_heads_for(width, head_channels)
        for attention in (block.attn1, block.attn2):
            attention.heads, attention.dim_head = heads, width // heads
        block.n_heads, block.d_head = heads, width // heads


def _unet_storage_dtype(memory_management, parameters: int) -> torch.dtype:
    from backend.args import dynamic_args

    chosen = dynamic_args.get("forge_unet_storage_dtype")
    if isinstance(chosen, torch.dtype):   # the UI's "Diffusion in Low Bits" (fp8 / fp16 / bf16)
        return chosen
    if chosen is not None:
        print(f"ColorizeDiffusion: the U-Net storage {chosen} is not supported for our U-Net; using the default")
    return memory_management.unet_dtype(model_params=parameters)


def _load_state(module: torch.nn.Module, tensors: dict, path: str, what: str) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"the {what} does not load into Forge's model: {len(missing)} missing "
                                    f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def build_unet(path: str, parameterization: str):
    """Our U-Net as a Forge ``UnetPatcher`` (forge-integration §4.5)."""
    from backend import memory_management
    from backend.modules.k_prediction import Prediction
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher
    from lib_colorize.checkpoint import _UNET_IGNORED, UNET_PREFIX, read_tensors
    from lib_colorize.models.unet import UNetConfig

    tensors = read_tensors(path, UNET_PREFIX, keep=lambda key: not _UNET_IGNORED.search(key))
    try:
        config = UNetConfig.from_state_dict(tensors)
    except (KeyError, ValueError) as error:
        raise CheckpointError(path, f"the U-Net (model.diffusion_model.*) has an unknown layout: {error}") from None
    parameters = sum(t.numel() for t in tensors.values())
    load_device = memory_management.get_torch_device()
    storage_dtype = _unet_storage_dtype(memory_management, parameters)
    computation_dtype = memory_management.get_computation_dtype(load_device, parameters=parameters)
    initial_device = memory_management.unet_inital_load_device(parameters=parameters, dtype=storage_dtype)
    with using_forge_operations(device=initial_device, dtype=storage_dtype,
                                manual_cast_enabled=storage_dtype != computation_dtype):
        unet = IntegratedUNet2DConditionModel.from_config(forge_unet_config(config)).to(device=initial_device,
                                                                                       dtype=storage_dtype)
    _load_state(unet, tensors, path, "U-Net (model.diffusion_model.*)")
    del tensors
    set_attention_heads(unet, config.head_channels)
    unet.eval().requires_grad_(False)
    unet.storage_dtype, unet.computation_dtype = storage_dtype, computation_dtype
    unet.load_device, unet.initial_device = load_device, initial_device
    unet.offload_device = memory_management.unet_offload_device()
    prediction = "v_prediction" if parameterization == "v" else "epsilon"
    return UnetPatcher.from_model(unet, diffusers_scheduler=None, config=None,
                                  k_predictor=Prediction(prediction_type=prediction))


def vae_config_dir() -> str:
    from backend.nn import vae

    backend_dir = os.path.dirname(os.path.dirname(os.path.abspath(vae.__file__)))
    return os.path.join(backend_dir, "huggingface", "stabilityai", "stable-diffusion-2-1", "vae")


def build_vae(path: str):
    """The file's VAE in Forge's ``IntegratedAutoencoderKL`` and ``VAE`` wrapper (Forge's SD 2.1 VAE config with
    the file's dimensions)."""
    from backend import memory_management
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from backend.patcher.vae import VAE
    from lib_colorize.checkpoint import VAE_PREFIX, read_tensors

    from lib_colorize.models.vae import VAEConfig

    tensors = read_tensors(path, VAE_PREFIX, keep=lambda key: not key.startswith("loss."))
    try:
        dims = VAEConfig.from_state_dict(tensors)
    except (KeyError, ValueError) as error:
        raise CheckpointError(path, f"the VAE (first_stage_model.*) has an unknown layout: {error}") from None
    config = dict(IntegratedAutoencoderKL.load_config(vae_config_dir()))
    levels = len(dims.ch_mult)
    config.update(block_out_channels=[dims.ch * m for m in dims.ch_mult], layers_per_block=dims.num_res_blocks,
                  latent_channels=dims.z_channels, down_block_types=["DownEncoderBlock2D"] * levels,
                  up_block_types=["UpDecoderBlock2D"] * levels)
    with using_forge_operations(device=memory_management.cpu, dtype=memory_management.vae_dtype()):
        vae = IntegratedAutoencoderKL.from_config(config)
    _load_state(vae, tensors, path, "VAE (first_stage_model.*)")
    wrapper = VAE(model=vae.eval().requires_grad_(False))
    wrapper.patcher.set_model_vae_decode_wrapper(decode_per_image)
    return wrapper


def decode_per_image(decode, samples: torch.Tensor) -> torch.Tensor:
    """Forge's VAE decodes a batch in one call; one image at a time (as the webui does) keeps each image of a
    batch equal to its single generation, bit for bit."""
    return torch.cat([decode(samples[i:i + 1]) for i in range(samples.shape[0])])


def build_sketch_encoder(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from lib_colorize.checkpoint import SKETCH_PREFIX, read_tensors
    from lib_colorize.models.sketch_encoder import SketchEncoder

    try:
        encoder = SketchEncoder.from_state_dict(read_tensors(path, SKETCH_PREFIX))
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(path, f"the sketch encoder (control_encoder.*) does not load: {error}") from None
    return encoder.eval().requires_grad_(False).to(dtype=dtype)


_loaded: dict = {"model": None}


#: what this adapter does not run yet, with the reason a user is given (``what``: the subject; ``verb``: "runs" or
#: "run" to agree with it)
FORGE_UNSUPPORTED = "in Forge, ColorizeDiffusion runs the SD2.1 models' default mode; {what} {verb} in the " \
                    "AUTOMATIC1111 webui and from the command line for now"


def require_supported_in_forge(info, name: str) -> None:
    """XL checkpoints are not hosted in Forge yet: a clear error, not a failed model build."""
    if info.family.is_xl:
        raise ColorizeError("ColorizeDiffusion: " + FORGE_UNSUPPORTED.format(
            what=f"the XL checkpoint {name}", verb="runs"))


def load_colorize_model(path: str) -> ColorizeModel:
    """Our models of ``path`` (built once per file; another file replaces them)."""
    from lib_colorize.checkpoint import inspect_checkpoint

    key = file_key(path)
    with _lock:
        current = _loaded["model"]
        if current is not None and current.key == key:
            return current
        release_colorize_model()
        info = inspect_checkpoint(path)
        require_supported_in_forge(info, checkpoint_name(path))
        print(f"ColorizeDiffusion: loading {checkpoint_name(path)} ({info.version}, {info.parameterization}) "
              "as our U-Net, VAE and sketch encoder")
        unet = build_unet(path, info.parameterization)
        model = ColorizeModel(path=path, key=key, parameterization=info.parameterization, info=info, unet=unet,
                              vae=build_vae(path),
                              sketch_encoder=build_sketch_encoder(path, unet.model.computation_dtype))
        _loaded["model"] = model
        return model


def loaded_colorize_model() -> Optional[ColorizeModel]:
    return _loaded["model"]


def release_colorize_model() -> None:
    """Drop our models (out of Forge's memory manager too)."""
    with _lock:
        model = _loaded["model"]
        _loaded["model"] = None
    if model is None:
        return
    try:
        from backend import memory_management

        loaded = memory_management.current_loaded_models
        for index in range(len(loaded) - 1, -1, -1):
            patcher = loaded[index].model
            if model.owns(patcher) or patcher is model.vae.patcher or patcher is _patchers.get(model.sketch_encoder):
                loaded.pop(index).model_unload()
    except ImportError:  # pragma: no cover - not in Forge
        pass
