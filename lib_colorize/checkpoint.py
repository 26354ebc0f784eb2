"""Inspect and load released ColorizeDiffusion checkpoints (method §1.3, §1.4, §11).

* :func:`inspect_checkpoint` reads only the key table (:func:`read_key_table`: the safetensors header, or the
  pickle's object tree without its tensor data) and decides the model version from the keys (cross-checked with the
  file-name prefix) and the parameterization (eps / v).
* :func:`load_checkpoint` builds the U-Net, VAE and sketch encoder with dimensions inferred from the weights and
  fills them with exactly the tensors they need (other tensors are never read). Extra modules of v1.5/v2 (LoRA,
  ``transformer``, ``thresh_embedder``, ``warp_modules``, ``style_modules``, ``bg_encoder``, ``style_encoder``) and
  the schedule buffers are accepted and ignored.
* ``.ckpt`` / ``.pt`` / ``.pth`` files: their key table comes from the pickle alone (storages are never read
  for it); tensors are read with ``torch.load(weights_only=True)``, memory-mapped for the zip format, so only the
  tensors taken are read from disk. Pickles that need arbitrary code are refused, without running it.

Every user-fixable problem raises :class:`~lib_colorize.errors.CheckpointError` naming the file.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SKETCH_PREFIX = "control_encoder."

COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "sketch_encoder": SKETCH_PREFIX}
COMPONENT_NAMES = {"unet": "U-Net (model.diffusion_model.*)", "vae": "VAE (first_stage_model.*)",
                   "sketch_encoder": "sketch encoder (control_encoder.*)"}

V15_PREFIXES = ("transformer.", "thresh_embedder.")
V2_PREFIXES = (UNET_PREFIX + "warp_modules.", UNET_PREFIX + "style_modules.", "bg_encoder.", "style_encoder.")
# Tensors under the U-Net prefix that the default-mode U-Net does not use (method §1.4, §11).
_UNET_IGNORED = re.compile(r"\.lora_(down|up)_(fg|bg)\.weight$|^(warp_modules|style_modules)\.")

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER_BYTES = 100 * 2 ** 20

VERSIONS = ("v1", "v1.5", "v2")
#: Training resolution of each version (method §1.2): the output size for a sketch whose size is not given.
NATIVE_SIZES = {"v1": 512, "v1.5": 512, "v2": 768}
# File-name prefixes of the released files (method §1.3): mult* = v1, switch* = v1.5, v2* = v2.
NAME_PREFIX_VERSIONS = (("mult", "v1"), ("switch", "v1.5"), ("v2", "v2"))


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one stored tensor: safetensors dtype name (``F32``, ``F16``, ``BF16``...) and shape."""

    dtype: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, decided from its keys and name without reading tensor data.

    ``dtypes``: component ("unet", "vae", "sketch_encoder") -> stored dtype names, e.g. ``{"vae": ("F16",)}``.
    ``name_version``: version suggested by the file-name prefix (None if the name has no known prefix).
    ``warnings``: human-readable notes (e.g. name and keys disagree); the keys win.
    """

    path: str
    version: str
    parameterization: str
    unet_keys_present: bool
    has_sketch_encoder: bool
    has_vae: bool
    dtypes: Dict[str, Tuple[str, ...]]
    extra_prefixes: Tuple[str, ...] = ()
    name_version: Optional[str] = None
    num_tensors: int = 0
    warnings: Tuple[str, ...] = ()
    context_dim: Optional[int] = None   # width of the cross-attention context (= the CLIP token width D)

    @property
    def native_size(self) -> int:
        """Side of the square the model was trained at (pixels)."""
        return NATIVE_SIZES.get(self.version, 512)


@dataclass
class LoadedCheckpoint:
    """Models built from a checkpoint (``None`` for components not requested). All in eval mode, no grad."""

    info: CheckpointInfo
    unet: Optional[nn.Module] = None
    vae: Optional[nn.Module] = None
    sketch_encoder: Optional[nn.Module] = None
    ignored_keys: int = 0
    extras: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Key-level classification


def is_colorize_checkpoint(keys: Iterable[str]) -> bool:
    """True if ``keys`` hold a ColorizeDiffusion model: a U-Net and a ``control_encoder`` (method §1.4)."""
    has_unet = has_sketch = False
    for key in keys:
        has_unet = has_unet or key.startswith(UNET_PREFIX)
        has_sketch = has_sketch or key.startswith(SKETCH_PREFIX)
        if has_unet and has_sketch:
            return True
    return False


def version_from_keys(keys: Iterable[str]) -> str:
    """v2 if any v2 module is present; v1.5 if ``transformer.*`` and ``thresh_embedder.*``; else v1 (method §1.4)."""
    keys = list(keys)
    if any(k.startswith(V2_PREFIXES) for k in keys):
        return "v2"
    if any(k.startswith("transformer.") for k in keys) and any(k.startswith("thresh_embedder.") for k in keys):
        return "v1.5"
    return "v1"


def version_from_name(path: "str | os.PathLike[str]") -> Optional[str]:
    """Version from the file-name prefix (``mult``/``switch``/``v2``, case-insensitive), or None."""
    name = os.path.basename(os.fspath(path)).lower()
    for prefix, version in NAME_PREFIX_VERSIONS:
        if name.startswith(prefix):
            return version
    return None


def parameterization_for(path: "str | os.PathLike[str]", version: str) -> str:
    """eps if the file name contains "eps"; otherwise v for v2 and eps for v1/v1.5 (method §1.2, §11: the
    ``mult-ft``/``mult-newft`` files are eps although their names lack "eps")."""
    if "eps" in os.path.basename(os.fspath(path)).lower():
        return "eps"
    return "v" if version == "v2" else "eps"


def _describe_foreign(keys: Sequence[str]) -> str:
    """Why a key set is not a ColorizeDiffusion checkpoint."""
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    if any(k.startswith("cond_stage_model.") for k in keys) or (has_unet and has_vae):
        return ("this is a plain Stable Diffusion checkpoint (it has cond_stage_model.*/U-Net weights but no "
                "control_encoder.* sketch encoder), not a ColorizeDiffusion checkpoint; use one of the released "
                "files mult-*.safetensors, switch-eps.safetensors or v2-full.safetensors")
    if has_unet:
        return "not a ColorizeDiffusion checkpoint: it has no control_encoder.* (sketch encoder) weights"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return (f"not a ColorizeDiffusion checkpoint: no model.diffusion_model.* (U-Net) or control_encoder.* keys "
            f"(found {sample}{', ...' if len(keys) > 3 else ''})")


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _fspath(path: "str | os.PathLike[str]") -> str:
    return os.fspath(path)


def read_safetensors_header(path: "str | os.PathLike[str]") -> Dict[str, TensorInfo]:
    """Parse the safetensors header (8-byte length + JSON) and check that the file holds all the data it declares.

    Raises CheckpointError for missing, truncated or corrupt files.
    """
    path = _fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"file is truncated or not a .safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(path, "file is truncated or not a .safetensors file (bad header length "
                                            f"{n} for a file of {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        infos, data_end = {}, 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            start, end = (int(v) for v in entry["data_offsets"])
            infos[key] = TensorInfo(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
            data_end = max(data_end, end, start)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"corrupt .safetensors header ({exc})") from None
    expected = 8 + n + data_end
    if size < expected:
        raise CheckpointError(path, f"file is truncated: the header declares {expected} bytes but the file has "
                                    f"{size} (incomplete download?)")
    return infos


_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class _TensorSource:
    """Uniform read access to a checkpoint: ``infos`` (key -> TensorInfo) and ``get(key)`` -> tensor."""

    def __init__(self, path: str, infos: Dict[str, TensorInfo], getter: Callable[[str], torch.Tensor],
                 close: Callable[[], None] = lambda: None):
        self.path = path
        self.infos = infos
        self._get = getter
        self._close = close

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._get(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad data
            raise CheckpointError(self.path, f"cannot read tensor {key!r}: {exc}") from exc

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "_TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_safetensors(path: str) -> _TensorSource:
    from safetensors import safe_open

    infos = read_safetensors_header(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError
        raise CheckpointError(path, f"not a readable .safetensors file (truncated or corrupt: {exc})") from exc
    return _TensorSource(path, infos, handle.get_tensor, close=lambda: None)


_REFUSED = ("refused: this pickle file cannot be loaded without running arbitrary code (it holds {what}, and a "
            "checkpoint may only hold tensors), so it was not loaded; convert it to .safetensors with a trusted tool "
            "or use a .safetensors release")
_STORAGE_DTYPES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
                   "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                   "ByteStorage": "U8", "BoolStorage": "BOOL", "UntypedStorage": "U8"}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
    """A storage class named in a pickle (``torch.FloatStorage``...), by its safetensors dtype name."""

    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES.get(name, name)


def _info_of(storage, size) -> TensorInfo:
    return TensorInfo(getattr(storage, "dtype", "?"), tuple(int(s) for s in size))


#: What the tensor-rebuilding globals of a torch pickle become while its key table is read: shape records.
_KEY_TABLE_GLOBALS: Dict[str, Callable] = {
    "collections.OrderedDict": dict,
    "torch._utils._rebuild_tensor_v2": lambda storage, offset, size, *rest: _info_of(storage, size),
    "torch._utils._rebuild_tensor": lambda storage, offset, size, *rest: _info_of(storage, size),
    "torch._utils._rebuild_parameter": lambda data, *rest: data,
    "torch._utils._rebuild_parameter_with_state": lambda data, *rest: data,
    "torch._utils._rebuild_meta_tensor_no_storage": lambda dtype, size, *rest: TensorInfo(
        _TORCH_DTYPE_NAMES.get(dtype, str(dtype)), tuple(int(s) for s in size)),
    "torch._tensor._rebuild_from_type_v2": lambda func, new_type, args, state: func(*args),
    "torch.serialization._get_layout": lambda name: name,
    "torch.Size": tuple,
}


class _Refused(Exception):
    """The pickle needs a global (or a persistent object) that a checkpoint may not hold."""


class _KeyTableUnpickler(pickle.Unpickler):
    """Reads the object tree of a torch pickle with every tensor replaced by its :class:`TensorInfo`.

    Storages are never read (``persistent_load`` returns their dtype only). Globals are restricted to those that
    ``torch.load(weights_only=True)`` allows, each replaced by a shape record: no other code can run.
    """

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full in _KEY_TABLE_GLOBALS:
            return _KEY_TABLE_GLOBALS[full]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"the global {full}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise _Refused(f"an unknown persistent id {pid!r}")
        storage_type = pid[1]
        return storage_type if isinstance(storage_type, _StorageType) else _StorageType(str(storage_type))


def _unpickle_key_table(handle) -> object:
    return _KeyTableUnpickler(handle).load()


def _pickle_object_tree(path: str) -> object:
    """The top-level object of a torch pickle (zip or legacy format) with tensors as :class:`TensorInfo`."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise ValueError("the zip archive has no data.pkl (not a torch checkpoint)")
            with archive.open(names[0]) as handle:
                return _unpickle_key_table(handle)
    with open(path, "rb") as handle:
        if _unpickle_key_table(handle) != _LEGACY_MAGIC:
            raise ValueError("not a torch checkpoint (no torch.save magic number)")
        _unpickle_key_table(handle)   # protocol version
        _unpickle_key_table(handle)   # system info
        return _unpickle_key_table(handle)


def _state_dict_of(path: str, obj: object) -> Mapping:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"not a checkpoint: the file holds a {type(obj).__name__}, not a state dict")
    return obj


def read_pickle_key_table(path: "str | os.PathLike[str]") -> Dict[str, TensorInfo]:
    """Key -> :class:`TensorInfo` of a ``.ckpt``/``.pt``/``.pth``/``.bin`` file without reading its tensor data.

    Only the pickled object tree is read (``data.pkl`` of the zip format, or the legacy format's leading
    pickle); the storages that follow are not. A top-level ``state_dict`` is unwrapped. Pickles that need any
    global beyond what ``torch.load(weights_only=True)`` allows are refused without running it.
    """
    path = _fspath(path)
    try:
        obj = _pickle_object_tree(path)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except _Refused as exc:
        raise CheckpointError(path, _REFUSED.format(what=exc)) from None
    except Exception as exc:  # zipfile errors, EOFError, ValueError for truncated/corrupt files
        raise CheckpointError(path, f"cannot read the file as a torch checkpoint (truncated or corrupt: "
                                    f"{type(exc).__name__}: {exc})") from None
    return {str(k): v for k, v in _state_dict_of(path, obj).items() if isinstance(v, TensorInfo)}


def _torch_load_weights_only(path: str) -> Dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows it (only the tensors used are then
    read from disk); unwraps a top-level ``state_dict``; refuses code-executing pickles."""
    kwargs = {"mmap": True} if zipfile.is_zipfile(path) and "mmap" in inspect.signature(torch.load).parameters \
        else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, _REFUSED.format(what=str(exc).splitlines()[0] if str(exc) else "an object")
                              ) from None
    except Exception as exc:  # zipfile errors, EOFError, RuntimeError for truncated/corrupt files
        raise CheckpointError(path, f"cannot read the file as a torch checkpoint (truncated or corrupt: "
                                    f"{type(exc).__name__}: {exc})") from None
    return {str(k): v for k, v in _state_dict_of(path, obj).items() if torch.is_tensor(v)}


def _open_pickle(path: str) -> _TensorSource:
    """The key table from the pickle alone; the tensors are loaded (memory-mapped) on the first read."""
    infos = read_pickle_key_table(path)
    loaded: Dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if not loaded:
            loaded.update(_torch_load_weights_only(path))
        return loaded[key].clone()   # a copy: nothing keeps the memory map open after close()

    return _TensorSource(path, infos, get, close=loaded.clear)


def _open(path: "str | os.PathLike[str]") -> _TensorSource:
    path = _fspath(path)
    if _is_pickle(path):
        return _open_pickle(path)
    # .safetensors, or an unknown suffix: read as safetensors, never unpickle implicitly
    return _open_safetensors(path)


def _is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def read_key_table(path: "str | os.PathLike[str]") -> Dict[str, TensorInfo]:
    """Key -> :class:`TensorInfo` of any checkpoint, without reading tensor data: the safetensors header, or the
    pickle's object tree (:func:`read_pickle_key_table`)."""
    path = _fspath(path)
    return read_pickle_key_table(path) if _is_pickle(path) else read_safetensors_header(path)


def read_tensors(path: "str | os.PathLike[str]", prefix: str = "", strip: bool = True,
                 keep: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` (stored dtype, CPU), keys stripped of the prefix when ``strip``.

    ``keep(key_without_prefix)`` filters further. Only the selected tensors are read.
    """
    with _open(path) as source:
        return _read_prefix(source, prefix, strip, keep)


def _read_prefix(source: _TensorSource, prefix: str, strip: bool = True,
                 keep: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    out = {}
    for key in source.infos:
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        if keep is not None and not keep(short):
            continue
        out[short if strip else key] = source.get(key)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Inspect


def _context_dim(infos: Mapping[str, TensorInfo]) -> Optional[int]:
    """Input width of the U-Net's cross-attention keys (``attn2.to_k.weight`` is (inner, context_dim))."""
    for key, info in infos.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight") and len(info.shape) == 2:
            return int(info.shape[1])
    return None


def _info_from_source(source: _TensorSource) -> CheckpointInfo:
    return info_from_key_table(source.path, source.infos)


def info_from_key_table(path: "str | os.PathLike[str]", infos: Mapping[str, TensorInfo]) -> CheckpointInfo:
    """What a checkpoint is, from its key table (:func:`read_key_table`, or :func:`key_table_of` a loaded state
    dict); CheckpointError naming ``path`` when it is not a ColorizeDiffusion checkpoint."""
    path, keys = _fspath(path), list(infos)
    if not is_colorize_checkpoint(keys):
        raise CheckpointError(path, _describe_foreign(keys))
    version = version_from_keys(keys)
    name_version = version_from_name(path)
    warnings = []
    if name_version is not None and name_version != version:
        warnings.append(f"the file name suggests {name_version} but the weights are {version}; using {version}")
    dtypes = {}
    for component, prefix in COMPONENT_PREFIXES.items():
        names = sorted({info.dtype for key, info in infos.items() if key.startswith(prefix)})
        if names:
            dtypes[component] = tuple(names)
    extra = sorted({p for p in V15_PREFIXES + V2_PREFIXES for k in keys if k.startswith(p)}
                   | ({UNET_PREFIX + "*lora*"} if any(".lora_" in k for k in keys) else set()))
    return CheckpointInfo(
        path=path,
        version=version,
        parameterization=parameterization_for(path, version),
        unet_keys_present=any(k.startswith(UNET_PREFIX) for k in keys),
        has_sketch_encoder=any(k.startswith(SKETCH_PREFIX) for k in keys),
        has_vae=any(k.startswith(VAE_PREFIX) for k in keys),
        dtypes=dtypes,
        extra_prefixes=tuple(extra),
        name_version=name_version,
        num_tensors=len(keys),
        warnings=tuple(warnings),
        context_dim=_context_dim(infos),
    )


def inspect_checkpoint(path: "str | os.PathLike[str]") -> CheckpointInfo:
    """Version, parameterization and contents of a checkpoint from its keys (no tensor data read for safetensors).

    Raises CheckpointError if the file is missing, unreadable, refused (code-executing pickle) or not a
    ColorizeDiffusion checkpoint (e.g. a plain SD checkpoint).
    """
    return info_from_key_table(path, read_key_table(path))


def key_table_of(state_dict: Mapping[str, object]) -> Optional[Dict[str, TensorInfo]]:
    """The key table of a state dict already in memory (None unless every value is a tensor)."""
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        return None
    return {str(k): TensorInfo(_TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Load


def _component_keys(source: _TensorSource, component: str) -> List[str]:
    prefix = COMPONENT_PREFIXES[component]
    keys = []
    for key in source.infos:
        if not key.startswith(prefix):
            continue
        if component == "unet" and _UNET_IGNORED.search(key[len(prefix):]):
            continue
        keys.append(key)
    return keys


class _ShapeView:
    """Shape-only stand-in for a tensor (config inference reads ``.shape`` / ``.dim()`` only)."""

    def __init__(self, shape: Tuple[int, ...]):
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)


def _build_model(source: _TensorSource, component: str) -> Tuple[nn.Module, Dict[str, Tuple[int, ...]]]:
    """Model for ``component`` on the meta device, with dimensions inferred from the stored shapes."""
    from .models.sketch_encoder import SketchEncoder, SketchEncoderConfig
    from .models.unet import UNetConfig, UNetModel
    from .models.vae import AutoencoderKL, VAEConfig

    prefix = COMPONENT_PREFIXES[component]
    shapes = {k[len(prefix):]: source.infos[k].shape for k in _component_keys(source, component)}
    if not shapes:
        raise CheckpointError(source.path, f"has no {COMPONENT_NAMES[component]} weights")
    views = {k: _ShapeView(s) for k, s in shapes.items()}
    config_cls, model_cls = {"unet": (UNetConfig, UNetModel), "vae": (VAEConfig, AutoencoderKL),
                             "sketch_encoder": (SketchEncoderConfig, SketchEncoder)}[component]
    if component == "vae":
        # Linear-style (C, C) attention weights are reshaped at load time (AutoencoderKL.normalize_state_dict)
        for k, v in views.items():
            if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k) and v.dim() == 2:
                shapes[k] = tuple(v.shape) + (1, 1)
                views[k] = _ShapeView(shapes[k])
    try:
        config = config_cls.from_state_dict(views)
    except KeyError as exc:
        raise CheckpointError(source.path, f"missing required key {prefix}{exc.args[0]} "
                                           f"({COMPONENT_NAMES[component]})") from None
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(source.path, f"the {COMPONENT_NAMES[component]} weights do not have the expected "
                                           f"layout ({exc})") from None
    with torch.device("meta"):
        model = model_cls(config)
    return model, shapes


def _check_keys(path: str, prefix: str, expected: Mapping[str, torch.Size], found: Mapping[str, Tuple[int, ...]],
                what: str) -> None:
    missing = [k for k in expected if k not in found]
    if missing:
        shown = ", ".join(prefix + k for k in missing[:5])
        raise CheckpointError(path, f"missing required keys for the {what}: {shown}"
                                    f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(path, f"tensor {prefix}{key} has shape {tuple(found[key])}, expected "
                                        f"{tuple(shape)} for the {what}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        shown = ", ".join(prefix + k for k in unexpected[:5])
        raise CheckpointError(path, f"unexpected keys for the {what} (different architecture?): {shown}"
                                    f"{f' (and {len(unexpected) - 5} more)' if len(unexpected) > 5 else ''}")


def _load_component(source: _TensorSource, component: str, dtype: torch.dtype,
                    device: "str | torch.device") -> nn.Module:
    model, shapes = _build_model(source, component)
    prefix = COMPONENT_PREFIXES[component]
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(source.path, prefix, expected, shapes, COMPONENT_NAMES[component])
    state = {}
    for key in expected:
        tensor = source.get(prefix + key)
        if tensor.dim() != len(shapes[key]):  # VAE Linear-style attention weight
            tensor = tensor.reshape(shapes[key])
        if not tensor.is_floating_point():
            raise CheckpointError(source.path, f"tensor {prefix}{key} has non-float dtype {tensor.dtype}")
        state[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_checkpoint(path: "str | os.PathLike[str]", dtype: torch.dtype = torch.float32,
                    device: "str | torch.device" = "cpu",
                    components: Sequence[str] = ("unet", "vae", "sketch_encoder")) -> LoadedCheckpoint:
    """Build and load the requested components, cast to ``dtype`` on ``device``.

    components: any of "unet", "vae", "sketch_encoder". Only their tensors are read. Raises CheckpointError
    (naming the file) for a foreign/corrupt/truncated file, missing required keys, or a tensor of the wrong shape.
    """
    unknown = [c for c in components if c not in COMPONENT_PREFIXES]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {sorted(COMPONENT_PREFIXES)}")
    with _open(path) as source:
        info = _info_from_source(source)
        loaded = LoadedCheckpoint(info=info)
        for component in components:
            setattr(loaded, component, _load_component(source, component, dtype, device))
        used = sum(len(_component_keys(source, c)) for c in components)
        loaded.ignored_keys = len(source.infos) - used
    return loaded
