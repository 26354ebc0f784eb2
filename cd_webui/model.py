"""ColorizeDiffusion checkpoints inside the webui: config choice, extension weights, settings.

What the webui loads itself (from the selected checkpoint and the YAML chosen here): the U-Net, the VAE and an
unused OpenCLIP text tower. What this module adds, keyed by the loaded checkpoint:

* **config** -- :func:`install_config_resolver` wraps ``sd_models_config.find_checkpoint_config`` so that a
  ColorizeDiffusion checkpoint (``control_encoder.*`` keys) without a ``<name>.yaml`` beside it gets
  ``configs/colorizediffusion-{eps,v}.yaml`` of this extension (webui-integration §4). A user's YAML next to the
  file still wins, and every other checkpoint goes through the webui's own guess unchanged;
* **schedule** -- :func:`repair_schedule` recomputes the LDM schedule buffers when a file lacks them (they would
  otherwise load as zeros: black images);
* **sketch encoder** -- read from the same file by key prefix (only those tensors), cached by
  ``(path, mtime, size)`` and dropped when another checkpoint is loaded (:func:`on_model_loaded`);
* **OpenCLIP ViT-H/14** (reference image tokens; text tower only for manipulation) -- from the models folder
  (``--colorize-dir``, setting, or ``models/ColorizeDiffusion``), downloaded by :mod:`lib_colorize.weights` from
  ``HF_ENDPOINT`` when allowed (progress in the webui's progress bar, :func:`download_progress`), else
  :class:`~lib_colorize.errors.MissingWeights` says what to put where.

XL checkpoints (sdxl-*, xlv2-*; method-xl §10): the webui builds sgm's ``DiffusionEngine`` from
``configs/colorizediffusion-xl-{eps,v}.yaml`` (its U-Net and VAE from the file, and the extension's text-free
:class:`~cd_webui.xl_conditioner.ReferenceOnlyConditioner`); this module adds the XL sketch encoder, the projector
(``proj.*``) and the XL reference encoder (CLIP ViT-bigG-14 and the WD tagger from the models folder,
:mod:`lib_colorize.weights`). The reference encoders are loaded for an encode and released afterwards: back to
the CPU on a GPU (the offload setting), dropped on a CPU-only machine (staged loading, method-xl §9).

Low VRAM: with ``--lowvram``/``--medvram`` our modules live on the CPU and visit the GPU only while they run
(the webui's own offloading does not know them); the reference encoder is moved off the GPU after use when the
setting asks for it.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from lib_colorize.errors import CheckpointError, NotColorizeModel
from lib_colorize.module_info import module_device
from lib_colorize.randomness import untouched_global_rng
from lib_colorize.schedule import ldm_schedule_buffers

logger = logging.getLogger(__name__)

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(EXTENSION_ROOT, "configs")
CONFIGS = {"eps": os.path.join(CONFIG_DIR, "colorizediffusion-eps.yaml"),
           "v": os.path.join(CONFIG_DIR, "colorizediffusion-v.yaml")}
XL_CONFIGS = {"eps": os.path.join(CONFIG_DIR, "colorizediffusion-xl-eps.yaml"),
              "v": os.path.join(CONFIG_DIR, "colorizediffusion-xl-v.yaml")}

SETTINGS_SECTION = ("colorizediffusion", "ColorizeDiffusion")
SETTING_MODELS_DIR = "colorize_models_path"
SETTING_OFFLOAD = "colorize_offload_reference_encoder"
SETTING_GALLERY = "colorize_extra_gallery_images"
SETTING_XL_ENCODER_DTYPE = "colorize_xl_encoder_cpu_dtype"
XL_ENCODER_CPU_DTYPES = ("float32", "bfloat16")
SETTING_CLIP_PRECISION = "colorize_reference_encoder_precision"
#: Precision of the OpenCLIP towers: float32 as in the original (these tokens are the whole reference
#: conditioning, and the towers are offloaded between uses anyway), or the webui's U-Net precision.
CLIP_PRECISIONS = ("float32", "webui")

#: open_clip architecture of the reference encoder (tests swap in a tiny registered one).
CLIP_ARCH = "ViT-H-14"
#: open_clip architecture of the XL models' CLIP image tower (ViT-bigG-14; tests swap in a tiny one).
XL_CLIP_ARCH = "ViT-bigG-14"

_lock = threading.RLock()


# --------------------------------------------------------------------------------------------------- settings
def _shared():
    from modules import shared

    return shared


def setting(key: str, default: Any) -> Any:
    """A webui setting, safe before :func:`on_ui_settings` registered it."""
    opts = getattr(_shared(), "opts", None)
    data = getattr(opts, "data", None) or {}
    value = data.get(key, default)
    return default if value is None else value


def on_ui_settings() -> None:
    """Settings section "ColorizeDiffusion" (registered through ``script_callbacks.on_ui_settings``)."""
    shared = _shared()
    options = (
        (SETTING_MODELS_DIR, "", "Folder for the OpenCLIP ViT-H/14 and line-extractor weights (empty: "
                                 "models/ColorizeDiffusion; --colorize-dir overrides)"),
        (SETTING_OFFLOAD, True, "Move the reference encoder (OpenCLIP ViT-H, about 2.5 GB) off the GPU after use"),
        (SETTING_GALLERY, True, "Add the processed sketch / manipulation heat map to the outputs when a "
                                "generation asks for them"),
    )
    for key, default, label in options:
        shared.opts.add_option(key, shared.OptionInfo(default, label, section=SETTINGS_SECTION))
    try:
        import gradio as gr
    except ImportError:  # pragma: no cover - the webui always has gradio
        gr = None

    def radio(choices) -> dict:
        return {"component": gr.Radio, "component_args": {"choices": list(choices)}} if gr is not None else {}

    shared.opts.add_option(SETTING_XL_ENCODER_DTYPE, shared.OptionInfo(
        "float32", "XL models on a CPU-only machine: precision of the reference encoders (CLIP ViT-bigG-14, "
                   "1.8 B parameters; bfloat16 halves their memory)", section=SETTINGS_SECTION,
        **radio(XL_ENCODER_CPU_DTYPES)))
    shared.opts.add_option(SETTING_CLIP_PRECISION, shared.OptionInfo(
        CLIP_PRECISIONS[0], "Precision of the reference encoder (OpenCLIP ViT-H): float32 as in the original, or "
                            "the webui's (float16 on most GPUs: half the memory, slightly different tokens)",
        section=SETTINGS_SECTION, **radio(CLIP_PRECISIONS)))


def models_dir() -> str:
    """Where the extension's own weights live: ``--colorize-dir`` > setting > ``<models>/ColorizeDiffusion``."""
    shared = _shared()
    folder = getattr(getattr(shared, "cmd_opts", None), "colorize_dir", None) or setting(SETTING_MODELS_DIR, "")
    if not folder:
        from modules import paths

        folder = os.path.join(paths.models_path, "ColorizeDiffusion")
    return os.path.abspath(os.path.expanduser(str(folder)))


# ----------------------------------------------------------------------------------------------------- config
def config_for_keys(keys: Iterable[str], filename: str) -> Optional[str]:
    """Our YAML for a ColorizeDiffusion key set (None for anything else): eps/v by the file-name rule."""
    from lib_colorize.checkpoint import is_colorize_checkpoint, parameterization_for, version_from_keys

    from lib_colorize.family import is_xl

    keys = list(keys)
    if not is_colorize_checkpoint(keys):
        return None
    version = version_from_keys(keys)
    return (XL_CONFIGS if is_xl(version) else CONFIGS)[parameterization_for(filename or "", version)]


def _make_resolver(original: Callable) -> Callable:
    def find_checkpoint_config(state_dict, info):
        if info is not None and state_dict is not None:
            from modules import sd_models_config

            filename = getattr(info, "filename", "")
            if filename:
                remember_state_dict(filename, state_dict)  # later "is it ColorizeDiffusion?" reads no file
            if sd_models_config.find_checkpoint_config_near_filename(info) is None:
                config = config_for_keys(state_dict.keys(), filename)
                if config is not None:
                    print(f"ColorizeDiffusion: using {os.path.basename(config)} for {info.filename}")
                    return config
        return original(state_dict, info)

    find_checkpoint_config.colorize_original = original
    return find_checkpoint_config


def install_config_resolver() -> None:
    """Make ColorizeDiffusion checkpoints load with our YAML (idempotent; :func:`uninstall_config_resolver` undoes
    it)."""
    from modules import sd_models_config

    current = sd_models_config.find_checkpoint_config
    if getattr(current, "colorize_original", None) is not None:
        current = current.colorize_original
    sd_models_config.find_checkpoint_config = _make_resolver(current)


def uninstall_config_resolver() -> None:
    from modules import sd_models_config

    original = getattr(sd_models_config.find_checkpoint_config, "colorize_original", None)
    if original is not None:
        sd_models_config.find_checkpoint_config = original


# ------------------------------------------------------------------------------------------------- checkpoint
def checkpoint_path(sd_model=None) -> Optional[str]:
    sd_model = sd_model if sd_model is not None else getattr(_shared(), "sd_model", None)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return getattr(info, "filename", None) or getattr(sd_model, "sd_model_checkpoint", None)


def file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


#: Key tables of checkpoint files by ``(path, mtime, size)`` (a CheckpointError when the file cannot be read):
#: whether a file is ColorizeDiffusion is decided from its keys once per file version, never by loading it.
_key_tables: "OrderedDict[tuple, object]" = OrderedDict()
KEY_TABLE_CACHE_SIZE = 32


def _remember_key_table(key: tuple, table: object) -> None:
    with _lock:
        _key_tables[key] = table
        _key_tables.move_to_end(key)
        while len(_key_tables) > KEY_TABLE_CACHE_SIZE:
            _key_tables.popitem(last=False)


def key_table(path: str) -> dict:
    """The file's key table (:func:`lib_colorize.checkpoint.read_key_table`: the safetensors header, or a pickle's
    object tree without its tensors), cached by file key."""
    from lib_colorize import checkpoint

    key = file_key(path)
    with _lock:
        table = _key_tables.get(key)
    if table is None:
        try:
            table = checkpoint.read_key_table(path)
        except CheckpointError as error:
            table = error
        _remember_key_table(key, table)
    if isinstance(table, CheckpointError):
        raise table
    return table


def remember_state_dict(path: str, state_dict) -> None:
    """Record the key table of a state dict the webui has just loaded from ``path`` (no file read)."""
    from lib_colorize.checkpoint import key_table_of

    try:
        key = file_key(path)
    except OSError:
        return
    table = key_table_of(state_dict)
    if table is not None:
        _remember_key_table(key, table)


def checkpoint_info(path: str):
    """:func:`lib_colorize.checkpoint.info_from_key_table` of the file's cached :func:`key_table`."""
    from lib_colorize.checkpoint import info_from_key_table

    return info_from_key_table(path, key_table(path))


def require_colorize_model(sd_model=None):
    """The checkpoint info of the loaded model; :class:`NotColorizeModel` with a clear message otherwise."""
    path = checkpoint_path(sd_model)
    if not path or not os.path.isfile(path):
        raise NotColorizeModel("ColorizeDiffusion: no checkpoint file is loaded; select a ColorizeDiffusion "
                               "checkpoint (mult-*.safetensors, switch-eps.safetensors, v2-full.safetensors)")
    try:
        return checkpoint_info(path)
    except CheckpointError as error:
        raise NotColorizeModel(f"ColorizeDiffusion is enabled but the selected checkpoint "
                               f"{os.path.basename(path)} cannot be used: {error.problem}") from None


#: "Use sketch size" without a ColorizeDiffusion checkpoint loaded: the v1 size.
DEFAULT_NATIVE_SIZE = 512


def native_size() -> int:
    """Native side (pixels) of the loaded checkpoint, for "Use sketch size": 512 for v1/v1.5, 768 for v2."""
    try:
        sd_model = getattr(_shared(), "sd_model", None)
        path = checkpoint_path(sd_model)
        return checkpoint_info(path).native_size if path and os.path.isfile(path) else DEFAULT_NATIVE_SIZE
    except (CheckpointError, OSError):
        return DEFAULT_NATIVE_SIZE


# ---------------------------------------------------------------------------------------------------- schedule
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def repair_schedule(sd_model) -> bool:
    """Refill the schedule buffers in place when the checkpoint did not carry them (all zero / not finite).

    Returns True when something was repaired.
    """
    ac = getattr(sd_model, "alphas_cumprod", None)
    if not isinstance(ac, torch.Tensor) or ac.is_meta:
        return False
    ac32 = ac.detach().float()
    if torch.isfinite(ac32).all() and float(ac32.min()) > 0 and float(ac32.max()) <= 1.0:
        return False
    values = ldm_schedule_buffers(int(ac.shape[0]), float(getattr(sd_model, "linear_start", 0.00085)),
                             float(getattr(sd_model, "linear_end", 0.012)))
    with torch.no_grad():
        for name in SCHEDULE_BUFFERS:
            buffer = getattr(sd_model, name, None)
            if isinstance(buffer, torch.Tensor) and tuple(buffer.shape) == tuple(values[name].shape):
                buffer.copy_(values[name].to(buffer.dtype))
    print("ColorizeDiffusion: the checkpoint has no noise-schedule buffers; recomputed the SD scaled-linear schedule")
    return True


# ---------------------------------------------------------------------------------------------- device helpers
def lowvram_active(sd_model=None) -> bool:
    cmd_opts = getattr(_shared(), "cmd_opts", None)
    return bool(getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False)
                or getattr(sd_model, "lowvram", False))


def compute_device() -> torch.device:
    from modules import devices

    return torch.device(devices.device) if devices.device is not None else torch.device("cpu")


def compute_dtype() -> torch.dtype:
    from modules import devices

    if compute_device().type == "cpu":
        return torch.float32
    return devices.dtype_unet


def unet_input_dtype() -> torch.dtype:
    """The dtype the webui computes its U-Net in (``devices.dtype_unet``: float16, or float32 with --no-half), for
    the reference tokens, sketch hints and injection latents. Not the U-Net's parameters' dtype: the "FP8 weight"
    setting stores those in float8, and the webui still runs in ``dtype_unet``."""
    from modules import devices

    return devices.dtype_unet


def clip_dtype() -> torch.dtype:
    """The OpenCLIP towers' dtype: float32 unless the setting asks for the webui's precision."""
    return compute_dtype() if setting(SETTING_CLIP_PRECISION, CLIP_PRECISIONS[0]) == "webui" else torch.float32


def make_room_on_gpu() -> None:
    """Under --lowvram/--medvram the webui keeps one of its modules on the GPU; send it back first."""
    if compute_device().type == "cpu":
        return
    from modules import lowvram

    lowvram.send_everything_to_cpu()


# ----------------------------------------------------------------------------------------------- sketch encoder
_sketch_cache: dict = {}


def sketch_encoder(sd_model=None):
    """The sketch encoder of the loaded checkpoint (``control_encoder.*``), on the compute device, or on the CPU
    under --lowvram/--medvram (use :func:`on_device`)."""
    from lib_colorize.checkpoint import SKETCH_PREFIX, XL_SKETCH_KEY, read_tensors
    from lib_colorize.models.sketch_encoder import SketchEncoder
    from lib_colorize.models.sketch_encoder_xl import SketchEncoderXL

    require_colorize_model(sd_model)
    path = checkpoint_path(sd_model)
    key = file_key(path)
    with _lock:
        encoder = _sketch_cache.get(key)
        if encoder is None:
            _sketch_cache.clear()
            tensors = read_tensors(path, SKETCH_PREFIX)
            xl = XL_SKETCH_KEY[len(SKETCH_PREFIX):] in tensors
            try:
                encoder = (SketchEncoderXL if xl else SketchEncoder).from_state_dict(tensors)
            except (KeyError, RuntimeError) as error:
                raise CheckpointError(path, f"the sketch encoder (control_encoder.*) does not load: {error}") from None
            encoder = encoder.eval().requires_grad_(False).to(dtype=compute_dtype())
            encoder.to("cpu" if lowvram_active(sd_model) else compute_device())
            _sketch_cache[key] = encoder
            logger.info("ColorizeDiffusion: sketch encoder loaded from %s", path)
    return encoder


#: A host's own way to bring a module to the compute device: ``placement(module, offload)`` returns a context
#: manager (the Forge adapter's hands our modules to Forge's memory manager). None: :class:`on_device` moves them.
placement: Optional[Callable] = None


class on_device:
    """``with on_device(module):`` -- the module on the compute device inside, back on the CPU afterwards when
    ``offload`` (default: under --lowvram/--medvram)."""

    def __init__(self, module: torch.nn.Module, offload: Optional[bool] = None):
        self.module = module
        self.offload = lowvram_active() if offload is None else offload
        self.hosted = placement(module, self.offload) if placement is not None else None

    def __enter__(self):
        if self.hosted is not None:
            return self.hosted.__enter__()
        device = compute_device()
        if module_device(self.module) != device:
            if self.offload:
                make_room_on_gpu()
            self.module.to(device)
        return self.module

    def __exit__(self, *exc):
        if self.hosted is not None:
            return self.hosted.__exit__(*exc)
        if self.offload and compute_device().type != "cpu":
            self.module.to("cpu")


# ------------------------------------------------------------------------------------------- XL reference encoder
_xl: dict = {"key": None, "encoder": None}


def hf_endpoint() -> str:
    return str(getattr(_shared(), "hf_endpoint", None) or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def xl_encoder_dtype() -> torch.dtype:
    """The XL reference encoders' precision: the webui's on a GPU; the setting's on a CPU (float32 default)."""
    if compute_device().type != "cpu":
        return compute_dtype()
    name = str(setting(SETTING_XL_ENCODER_DTYPE, "float32"))
    return getattr(torch, name if name in XL_ENCODER_CPU_DTYPES else "float32")


def xl_reference_encoder(sd_model=None):
    """The XL reference encoder of the loaded checkpoint (its projector from the file, the encoders' files from
    the models folder, found or downloaded before anything is loaded)."""
    from lib_colorize.checkpoint import PROJECTOR_PREFIX, read_tensors
    from lib_colorize.models.clip_xl import clip_config_for
    from lib_colorize.models.projector import ClusterConcat
    from lib_colorize.models.xl_reference import xl_reference_encoder as build

    require_colorize_model(sd_model)
    path = checkpoint_path(sd_model)
    dtype = xl_encoder_dtype()
    key = (file_key(path), models_dir(), str(dtype), str(compute_device()), XL_CLIP_ARCH)
    with _lock:
        if _xl["key"] == key:
            return _xl["encoder"]
        try:
            projector = ClusterConcat.from_state_dict(read_tensors(path, PROJECTOR_PREFIX))
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(path, f"the projector (proj.*) does not load: {error}") from None
        projector = projector.eval().requires_grad_(False).to(dtype=compute_dtype())
        keep = "none" if compute_device().type == "cpu" else ("cpu" if offload_clip() else "device")
        encoder = build(projector, models_dir(), device=compute_device(), dtype=dtype, keep=keep,
                        progress=download_progress, endpoint=hf_endpoint(),
                        clip_config=clip_config_for(XL_CLIP_ARCH))
        _xl.update(key=key, encoder=encoder)
        return encoder


def first_stage_posterior(sd_model, image: torch.Tensor):
    """The VAE posterior of ``image`` (its mean and std; the injection and the enhance latents draw their own seeded
    samples): ldm's ``encode_first_stage`` returns it; sgm's (XL) returns an already sampled and scaled latent, so
    the posterior is taken from the first stage's encoder and ``quant_conv`` (method-xl §10.3 #8)."""
    if not getattr(sd_model, "is_sdxl", False):
        return sd_model.encode_first_stage(image)
    from lib_colorize.models.vae import DiagonalGaussianDistribution

    first_stage = sd_model.first_stage_model
    return DiagonalGaussianDistribution(first_stage.quant_conv(first_stage.encoder(image)))


_xlv2: dict = {"key": None, "loras": None}


def xlv2_loras(sd_model, device, dtype) -> dict:
    """xlv2's background LoRA from the loaded file (read on first use, kept while the file is loaded)."""
    from lib_colorize.checkpoint import UNET_PREFIX, read_tensors
    from lib_colorize.enhance_xl import load_xlv2_lora

    path = checkpoint_path(sd_model)
    key = (file_key(path), str(device), str(dtype))
    with _lock:
        if _xlv2["key"] != key:
            tensors = read_tensors(path, UNET_PREFIX, keep=lambda name: ".lora_" in name)
            _xlv2.update(key=key, loras=load_xlv2_lora(tensors, dtype=dtype, device=device))
        return _xlv2["loras"]


def xlv2_reference_net(sd_model, device, dtype):
    """xlv2's ReferenceNet (``bg_encoder.*``, 2.0 B parameters), loaded for one generation's banks; the caller
    drops it afterwards (the banks are cached by content)."""
    from lib_colorize.checkpoint import load_checkpoint

    print("ColorizeDiffusion: loading the xlv2 ReferenceNet for this generation's banks")
    return load_checkpoint(checkpoint_path(sd_model), dtype=dtype, device=device,
                           components=("reference_net",)).reference_net


def encode_xl_reference(image: torch.Tensor) -> torch.Tensor:
    """Reference (1,3,H,W) in [-1,1] -> the XL context (1, 196, 2048) on the compute device (cached by content)."""
    with _clip_use_lock:
        encoder = xl_reference_encoder()
        return token_cache().get_or_encode(encoder, image).to(compute_device())


# ------------------------------------------------------------------------------------------------------ OpenCLIP
_clip: dict = {"path": None, "visual": None, "text": None}


def download_progress(event) -> None:
    """Progress of a first-run download (OpenCLIP, line extractors) in the webui: the progress bar's text
    (``shared.state.textinfo``) while it runs, and a console line when it starts and ends."""
    from lib_colorize.weights import format_bytes

    state = getattr(_shared(), "state", None)
    if event.finished:
        if state is not None:
            state.textinfo = None
        print(f"ColorizeDiffusion: {'downloaded' if event.ok else 'could not download'} {event.filename}")
        return
    if event.done == 0:
        print(f"ColorizeDiffusion: downloading {event.name} ({event.filename}"
              f"{', ' + format_bytes(event.total) if event.total else ''}) into {event.destination}")
    done = format_bytes(event.done)
    amount = f"{done} of {format_bytes(event.total)}" if event.total else done
    percent = f", {event.fraction:.0%}" if event.fraction is not None else ""
    if state is not None:
        state.textinfo = f"ColorizeDiffusion: downloading {event.filename} ({amount}{percent})"


def clip_weights_path() -> str:
    """Local OpenCLIP ViT-H/14 weights, or a download into the models folder from ``HF_ENDPOINT`` (the webui's
    ``shared.hf_endpoint``), its progress shown in the webui."""
    from lib_colorize.weights import CLIP_VIT_H, ensure_weight_file

    return os.fspath(ensure_weight_file(CLIP_VIT_H, models_dir(), progress=download_progress,
                                        endpoint=hf_endpoint()))


def _load_clip_towers(towers: Sequence[str]) -> None:
    from lib_colorize.models import clip

    path = clip_weights_path()
    with _lock:
        if _clip["path"] != path:
            _clip.update(path=path, visual=None, text=None)
        missing = [t for t in towers if _clip[t] is None]
        dtype = clip_dtype()
        for tower in towers:
            if _clip[tower] is not None:
                _clip[tower].to(dtype=dtype)   # the setting may have changed since it was loaded
        if not missing:
            return
        print(f"ColorizeDiffusion: loading OpenCLIP {CLIP_ARCH} ({', '.join(missing)}) from {path}")
        with untouched_global_rng():   # building the towers initialises weights from the global RNG
            loaded = clip.load_clip(CLIP_ARCH, weights=path, device="cpu", dtype=torch.float32, towers=missing)
        if loaded.reference is not None:
            loaded.reference.to(dtype=dtype)
            _clip["visual"] = loaded.reference
        if loaded.text is not None:
            loaded.text.to(dtype=dtype)
            _clip["text"] = loaded.text


def reference_encoder():
    _load_clip_towers(("visual",))
    return _clip["visual"]


def text_encoder():
    _load_clip_towers(("text",))
    return _clip["text"]


class _EncoderOnDevice:
    """What :class:`~lib_colorize.models.clip.ReferenceTokenCache` sees: the encoder's identity with the
    dtype/device it *computes* in, so a cache hit never moves the 2.5 GB encoder to the GPU."""

    def __init__(self, encoder, offload: bool):
        self.encoder = encoder
        self.offload = offload
        self.instance_id = getattr(encoder, "instance_id", id(encoder))
        self._probe = torch.empty(0, dtype=clip_dtype(), device=compute_device())

    def parameters(self):
        yield self._probe

    def encode_full(self, images: torch.Tensor) -> torch.Tensor:
        with on_device(self.encoder, offload=self.offload):
            return self.encoder.encode_full(images.to(compute_device()))


_token_cache = None


def token_cache():
    global _token_cache
    from lib_colorize.models.clip import ReferenceTokenCache

    with _lock:
        if _token_cache is None:
            _token_cache = ReferenceTokenCache(max_entries=8)
        return _token_cache


def offload_clip() -> bool:
    return bool(setting(SETTING_OFFLOAD, True)) or lowvram_active()


#: Serialises use of the OpenCLIP towers (a generation and the UI's "Visualize" button may overlap; both move
#: the towers between devices). Re-entrant: the heat map of a generation runs inside it.
_clip_use_lock = threading.RLock()


def encode_reference_full(image: torch.Tensor) -> torch.Tensor:
    """Reference (1,3,H,W) in [-1,1] -> full tokens (1, 1+N, D) on the compute device (cached by content)."""
    with _clip_use_lock:
        proxy = _EncoderOnDevice(reference_encoder(), offload_clip())
        return token_cache().get_or_encode(proxy, image).to(compute_device())


def encode_text(texts: Sequence[str]) -> torch.Tensor:
    """Manipulation prompts -> (N, 1, D) unit EOT embeddings on the compute device."""
    with _clip_use_lock:
        encoder = text_encoder()
        encoder.validate(list(texts))
        with on_device(encoder, offload=offload_clip()):
            return encoder.encode(list(texts))


def count_tokens(text: str) -> int:
    from lib_colorize.models.clip import count_tokens as count

    return count(text)


# ---------------------------------------------------------------------------------------------------- callbacks
def clear_caches(*, clip_too: bool = False) -> None:
    with _lock:
        _sketch_cache.clear()
        _key_tables.clear()
        _xl.update(key=None, encoder=None)
        _xlv2.update(key=None, loras=None)
        if clip_too:
            _clip.update(path=None, visual=None, text=None)
            if _token_cache is not None:
                _token_cache.clear()


def on_model_loaded(sd_model) -> None:
    """Drop the sketch encoder and the XL sketch encoder of another checkpoint; repair a missing schedule of a
    ColorizeDiffusion model."""
    path = checkpoint_path(sd_model)
    try:
        key = file_key(path) if path and os.path.isfile(path) else None
    except OSError:
        key = None
    with _lock:
        if key not in _sketch_cache:
            _sketch_cache.clear()
        if _xl["key"] is not None and _xl["key"][0] != key:
            _xl.update(key=None, encoder=None)
    if is_colorize_model(sd_model):
        repair_schedule(sd_model)
        if path and not _has_text_encoder(path):
            clear_text_encoder(sd_model)


def is_colorize_model(sd_model=None) -> bool:
    """Whether the loaded model is a ColorizeDiffusion checkpoint: it was built with our config, or its file's
    (cached) key table says so. Reads no tensor data."""
    sd_model = sd_model if sd_model is not None else getattr(_shared(), "sd_model", None)
    used_config = os.path.abspath(str(getattr(sd_model, "used_config", "") or ""))
    ours = {os.path.abspath(c) for c in (*CONFIGS.values(), *XL_CONFIGS.values())}
    return used_config in ours or _is_colorize_file(checkpoint_path(sd_model))


def _has_text_encoder(path: str) -> bool:
    """Whether the file carries ``cond_stage_model.*`` tensors (released ColorizeDiffusion files do not)."""
    try:
        return any(key.startswith("cond_stage_model.") for key in key_table(path))
    except (CheckpointError, OSError):
        return True  # unknown: leave the webui's model alone


def clear_text_encoder(sd_model) -> bool:
    """Give the webui's text encoder constant weights when the checkpoint has none: zeros, except every LayerNorm
    bias, which is 1.

    The webui builds the (unused) OpenCLIP text tower with weight initialisation disabled, so the tensors the file
    does not provide keep whatever memory ``torch.empty`` returned: prompt conds then differ from one start to the
    next and may hold NaN. ColorizeDiffusion never uses them. With zero weights every layer passes zeros on, and
    the last LayerNorm turns them into its bias: the cond is 1 everywhere. It must not be 0: the webui's default
    emphasis rescales the cond by ``mean(z) / mean(z · multipliers)``, which is 0/0 for a zero cond (NaN, a black
    image). With 1 every emphasis mode gives finite conds.
    """
    cond_stage = getattr(sd_model, "cond_stage_model", None)
    if cond_stage is None or next(cond_stage.parameters(), None) is None:
        return False   # none, or the XL config's text-free conditioner
    with torch.no_grad():
        for parameter in cond_stage.parameters():
            if not parameter.is_meta:
                parameter.zero_()
        for module in cond_stage.modules():
            bias = getattr(module, "bias", None)
            if isinstance(module, torch.nn.LayerNorm) and isinstance(bias, torch.Tensor) and not bias.is_meta:
                bias.fill_(1.0)
    print("ColorizeDiffusion: the checkpoint has no text encoder (not used by ColorizeDiffusion); gave it constant "
          "weights (prompts have no effect with this checkpoint)")
    return True


def _is_colorize_file(path: Optional[str]) -> bool:
    if not path or not os.path.isfile(path):
        return False
    try:
        checkpoint_info(path)
        return True
    except CheckpointError:
        return False
