"""Inspect and load released ColorizeDiffusion checkpoints (method §1.3, §1.4, §11; method-xl §1.3-1.5).

* :func:`inspect_checkpoint` reads only the key table (:func:`read_key_table`: the safetensors header, or the
  pickle's object tree without its tensor data) and decides the model version from the keys (cross-checked with the
  file-name prefix) and the parameterization (eps / v). XL files (``sdxl``, ``xlv2``) are recognised by their keys
  (the multi-scale sketch encoder, the ``proj.*`` projector, the 512-wide ``label_emb``); their variant comes from
  the file name as in the original app (method-xl §1.3), checked against the keys (an ``xlv2`` file must carry its
  ReferenceNet ``bg_encoder.*``).
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
from .memory import release_memory

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SKETCH_PREFIX = "control_encoder."

PROJECTOR_PREFIX = "proj."
REFERENCE_NET_PREFIX = "bg_encoder."

COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "sketch_encoder": SKETCH_PREFIX,
                      "projector": PROJECTOR_PREFIX, "reference_net": REFERENCE_NET_PREFIX}
COMPONENT_NAMES = {"unet": "U-Net (model.diffusion_model.*)", "vae": "VAE (first_stage_model.*)",
                   "sketch_encoder": "sketch encoder (control_encoder.*)", "projector": "projector (proj.*)",
                   "reference_net": "ReferenceNet (bg_encoder.*)"}
#: Components of each family that :func:`load_checkpoint` loads by default.
DEFAULT_COMPONENTS = {"sd2.1": ("unet", "vae", "sketch_encoder"), "sdxl": ("unet", "vae", "sketch_encoder", "projector")}

V15_PREFIXES = ("transformer.", "thresh_embedder.")
V2_PREFIXES = (UNET_PREFIX + "warp_modules.", UNET_PREFIX + "style_modules.", "bg_encoder.", "style_encoder.")
# Tensors under the U-Net prefix that the default-mode U-Net does not use (method §1.4, §11; method-xl §1.5:
# xlv2's background LoRA and its never-used conv_fg).
_UNET_IGNORED = re.compile(r"\.lora_(down|up)_(fg|bg|background)\.weight$|^(warp_modules|style_modules)\.|^conv_fg\.")
#: The key that marks the XL multi-scale sketch encoder (method-xl §1.5).
XL_SKETCH_KEY = SKETCH_PREFIX + "attn_layer.to_q.weight"

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER_BYTES = 100 * 2 ** 20

VERSIONS = ("v1", "v1.5", "v2", "sdxl", "xlv2")
# File-name prefixes of the released files (method §1.3): mult* = v1, switch* = v1.5, v2* = v2; XL (method-xl §1.3):
# sdxl*, xlv2*, tested in that order.
NAME_PREFIX_VERSIONS = (("mult", "v1"), ("switch", "v1.5"), ("v2", "v2"), ("sdxl", "sdxl"), ("xlv2", "xlv2"))


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one stored tensor: safetensors dtype name (``F32``, ``F16``, ``BF16``...), shape, and its
    byte range in the file (absolute offsets; empty for tensors that do not come from a .safetensors header)."""

    dtype: str
    shape: Tuple[int, ...]
    offsets: Tuple[int, ...] = ()


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
    def family(self):
        """The :class:`~lib_colorize.family.ModelFamily` of :attr:`version`."""
        from .family import family_of

        return family_of(self.version)

    @property
    def native_size(self) -> int:
        """Side of the square the model was trained at (pixels; :data:`lib_colorize.family.NATIVE_SIZES`)."""
        from .family import NATIVE_SIZES

        return NATIVE_SIZES.get(self.version, 512)


@dataclass
class LoadedCheckpoint:
    """Models built from a checkpoint (``None`` for components not requested). All in eval mode, no grad."""

    info: CheckpointInfo
    unet: Optional[nn.Module] = None
    vae: Optional[nn.Module] = None
    sketch_encoder: Optional[nn.Module] = None
    projector: Optional[nn.Module] = None        # XL: ClusterConcat (proj.*)
    reference_net: Optional[nn.Module] = None    # xlv2: the ReferenceNet (bg_encoder.*)
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


def is_xl_keys(keys: Iterable[str]) -> bool:
    """True for the XL layout: the multi-scale attention sketch encoder (method-xl §1.5)."""
    return XL_SKETCH_KEY in set(keys)


def version_from_keys(keys: Iterable[str]) -> str:
    """XL: xlv2 with a ReferenceNet (``bg_encoder.*``), else sdxl. SD2.1: v2 if any v2 module is present; v1.5
    if ``transformer.*`` and ``thresh_embedder.*``; else v1 (method §1.4)."""
    keys = list(keys)
    if is_xl_keys(keys):
        return "xlv2" if any(k.startswith(REFERENCE_NET_PREFIX) for k in keys) else "sdxl"
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
    """eps if the file name contains "eps"; otherwise v for v2 and the XL models (method-xl §1.3) and eps for
    v1/v1.5 (method §1.2, §11: the ``mult-ft``/``mult-newft`` files are eps although their names lack "eps")."""
    if "eps" in os.path.basename(os.fspath(path)).lower():
        return "eps"
    return "v" if version in ("v2", "sdxl", "xlv2") else "eps"


def xl_version(path: "str | os.PathLike[str]", keys: Sequence[str]) -> Tuple[str, Tuple[str, ...]]:
    """The XL variant (method-xl §1.3): from the file-name prefix (``sdxl``/``xlv2``), else from the keys, with
    the reasons as warnings. An ``xlv2`` name without ``bg_encoder.*`` keys raises CheckpointError."""
    from_keys = version_from_keys(keys)
    from_name = version_from_name(path)
    if from_name == "xlv2" and from_keys != "xlv2":
        raise CheckpointError(path, "the name says xlv2 but the file has no ReferenceNet (bg_encoder.*) weights; "
                                    "rename it to sdxl-... if it is the base model")
    if from_name == "sdxl":
        notes = ("the file carries xlv2 modules (bg_encoder.*), which the sdxl model does not use",) \
            if from_keys == "xlv2" else ()
        return "sdxl", notes
    if from_name == "xlv2":
        return "xlv2", ()
    return from_keys, (f"the file name does not start with sdxl or xlv2 (the original app needs that); the keys "
                       f"say {from_keys}",)


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
            infos[key] = TensorInfo(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]),
                                    (8 + n + start, 8 + n + end))
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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_stored_tensor(handle, path: str, key: str, info: TensorInfo) -> torch.Tensor:
    """One tensor read from its byte range with plain file reads into its own memory. Unlike a memory map, the
    file's pages never join the process's resident memory, so loading a 10 GB checkpoint costs its tensors,
    not twice that."""
    dtype = _SAFETENSORS_DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(path, f"tensor {key!r} has the unsupported dtype {info.dtype}")
    tensor = torch.empty(info.shape, dtype=dtype)
    start, end = info.offsets
    if end - start != tensor.numel() * tensor.element_size():
        raise CheckpointError(path, f"tensor {key!r}: {end - start} bytes stored for shape {list(info.shape)} "
                                    f"{info.dtype}")
    if tensor.numel():
        handle.seek(start)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if handle.readinto(view) != len(view):
            raise CheckpointError(path, f"file is truncated: tensor {key!r} ends past the end of the file")
    return tensor


def _open_safetensors(path: str) -> _TensorSource:
    infos = read_safetensors_header(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    return _TensorSource(path, infos, lambda key: _read_stored_tensor(handle, path, key, infos[key]),
                         close=handle.close)


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
    name_version = version_from_name(path)
    warnings = []
    if is_xl_keys(keys):
        version, notes = xl_version(path, keys)
        warnings.extend(notes)
    else:
        version = version_from_keys(keys)
        if name_version is not None and name_version != version:
            warnings.append(f"the file name suggests {name_version} but the weights are {version}; using {version}")
    dtypes = {}
    from .family import family_of

    components = DEFAULT_COMPONENTS[family_of(version).name] + (("reference_net",) if version == "xlv2" else ())
    for component in components:
        prefix = COMPONENT_PREFIXES[component]
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
    from .models.projector import ClusterConcat, ProjectorConfig
    from .models.sketch_encoder import SketchEncoder, SketchEncoderConfig
    from .models.sketch_encoder_xl import SketchEncoderXL, SketchEncoderXLConfig
    from .models.unet import UNetConfig, UNetModel
    from .models.vae import AutoencoderKL, VAEConfig

    prefix = COMPONENT_PREFIXES[component]
    shapes = {k[len(prefix):]: source.infos[k].shape for k in _component_keys(source, component)}
    if not shapes:
        raise CheckpointError(source.path, f"has no {COMPONENT_NAMES[component]} weights")
    views = {k: _ShapeView(s) for k, s in shapes.items()}
    sketch_classes = (SketchEncoderXLConfig, SketchEncoderXL) if XL_SKETCH_KEY in source.infos else \
        (SketchEncoderConfig, SketchEncoder)
    config_cls, model_cls = {"unet": (UNetConfig, UNetModel), "vae": (VAEConfig, AutoencoderKL),
                             "sketch_encoder": sketch_classes, "projector": (ProjectorConfig, ClusterConcat),
                             "reference_net": (UNetConfig, UNetModel)}[component]
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


def _fill(source: _TensorSource, prefix: str, model: nn.Module, shapes: Mapping[str, Tuple[int, ...]], what: str,
          dtype: torch.dtype, device: "str | torch.device") -> nn.Module:
    """Load exactly ``model``'s tensors from ``prefix + key`` (names and shapes checked first), cast to ``dtype``."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(source.path, prefix, expected, shapes, what)
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


def _load_component(source: _TensorSource, component: str, dtype: torch.dtype,
                    device: "str | torch.device") -> nn.Module:
    model, shapes = _build_model(source, component)
    return _fill(source, COMPONENT_PREFIXES[component], model, shapes, COMPONENT_NAMES[component], dtype, device)


def load_checkpoint(path: "str | os.PathLike[str]", dtype: torch.dtype = torch.float32,
                    device: "str | torch.device" = "cpu",
                    components: Optional[Sequence[str]] = None) -> LoadedCheckpoint:
    """Build and load the requested components, cast to ``dtype`` on ``device``.

    components: any of "unet", "vae", "sketch_encoder", "projector" (XL), "reference_net" (xlv2); default: the
    family's (:data:`DEFAULT_COMPONENTS`). Only their tensors are read. Raises CheckpointError (naming the file)
    for a foreign/corrupt/truncated file, missing required keys, or a tensor of the wrong shape.
    """
    unknown = [c for c in components or () if c not in COMPONENT_PREFIXES]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {sorted(COMPONENT_PREFIXES)}")
    with _open(path) as source:
        info = _info_from_source(source)
        if components is None:
            components = DEFAULT_COMPONENTS[info.family.name]
        loaded = LoadedCheckpoint(info=info)
        for component in components:
            setattr(loaded, component, _load_component(source, component, dtype, device))
        used = sum(len(_component_keys(source, c)) for c in components)
        loaded.ignored_keys = len(source.infos) - used
    release_memory()   # the stored copies of cast tensors
    return loaded


# ---------------------------------------------------------------------------------------------------------------------
# Enhance modules of v1.5 / v2 (method-enhance §2)

#: The separately loadable extra modules: part -> (key prefix, description).
ENHANCE_PARTS = {
    "lora": (UNET_PREFIX, "attn2 split LoRA (model.diffusion_model.*.attn2.to_{q,k,v}.lora_*)"),
    "thresh_embedder": ("thresh_embedder.", "v1.5 threshold embedder (thresh_embedder.*)"),
    "cluster_transformer": ("transformer.", "v1.5 ClusterTransformer (transformer.*)"),
    "warp_modules": (UNET_PREFIX + "warp_modules.", "v2 warp modules (model.diffusion_model.warp_modules.*)"),
    "style_modules": (UNET_PREFIX + "style_modules.", "v2 style modules (model.diffusion_model.style_modules.*)"),
    "bg_encoder": ("bg_encoder.", "v2 background encoder (bg_encoder.*)"),
    "style_encoder": ("style_encoder.", "v2 style encoder (style_encoder.*)"),
}


def _unet_config_from_header(source: _TensorSource):
    from .models.unet import UNetConfig

    shapes = {k[len(UNET_PREFIX):]: _ShapeView(info.shape) for k, info in source.infos.items()
              if k.startswith(UNET_PREFIX) and not _UNET_IGNORED.search(k[len(UNET_PREFIX):])}
    return UNetConfig.from_state_dict(shapes)


def _part_shapes(source: _TensorSource, part: str) -> Dict[str, Tuple[int, ...]]:
    prefix = ENHANCE_PARTS[part][0]
    return {k[len(prefix):]: source.infos[k].shape for k in source.infos if k.startswith(prefix)}


def _load_lora(source: _TensorSource, dtype: torch.dtype, device) -> dict:
    """attn2 name -> AttentionLoRA, each low-rank pair checked against its base linear's shape in the file."""
    from .models.enhance import LORA_KEY, LORA_PROJECTIONS, AttentionLoRA, SplitLoRA

    found: dict = {}
    for key, info in source.infos.items():
        match = LORA_KEY.match(key[len(UNET_PREFIX):]) if key.startswith(UNET_PREFIX) else None
        if match:
            found.setdefault(match["attn"], {})[(match["proj"], match["side"], match["part"])] = (key, info.shape)
    loras = {}
    for attn, parts in sorted(found.items()):
        shapes = {}
        for proj in LORA_PROJECTIONS:
            base_key = f"{UNET_PREFIX}{attn}.{proj}.weight"
            if base_key not in source.infos:
                raise CheckpointError(source.path, f"LoRA tensors for {UNET_PREFIX}{attn}.{proj} but no {base_key}")
            out_features, in_features = source.infos[base_key].shape
            ranks = {}
            for side in SplitLoRA.SIDES:
                down = parts.get((proj, side, "down"))
                up = parts.get((proj, side, "up"))
                name = f"{UNET_PREFIX}{attn}.{proj}."
                if down is None or up is None:
                    missing = name + SplitLoRA.stored_key(side, "down" if down is None else "up")
                    raise CheckpointError(source.path, f"missing required key {missing} (attn2 split LoRA)")
                rank = down[1][0]
                if tuple(down[1]) != (rank, in_features):
                    raise CheckpointError(source.path, f"tensor {down[0]} has shape {tuple(down[1])}, expected "
                                                       f"(rank, {in_features}) for the attn2 split LoRA")
                if tuple(up[1]) != (out_features, rank):
                    raise CheckpointError(source.path, f"tensor {up[0]} has shape {tuple(up[1])}, expected "
                                                       f"({out_features}, {rank}) for the attn2 split LoRA")
                ranks[side] = rank
            shapes[proj] = (in_features, out_features, ranks)
        module = AttentionLoRA(shapes)
        for proj, lora in module.projections.items():
            tensors = {}
            for side in SplitLoRA.SIDES:
                for part in ("down", "up"):
                    stored = f"{UNET_PREFIX}{attn}.{proj}.{SplitLoRA.stored_key(side, part)}"
                    tensors[SplitLoRA.stored_key(side, part)] = source.get(stored).to(device=device, dtype=dtype)
            lora.load_stored(tensors)
        loras[attn] = module.requires_grad_(False).eval()
    return loras


def _build_enhance_part(source: _TensorSource, part: str, shapes: Dict[str, Tuple[int, ...]]) -> nn.Module:
    """The module of ``part`` on the meta device, dimensioned from the file (its own shapes, or the U-Net's)."""
    from .models import enhance

    views = {k: _ShapeView(v) for k, v in shapes.items()}
    with torch.device("meta"):
        if part == "thresh_embedder":
            return enhance.ThresholdEmbedder.from_shapes(views)
        if part == "cluster_transformer":
            return enhance.ClusterTransformer.from_shapes(views)
        if part in ("bg_encoder", "style_encoder"):
            return enhance.UNetEncoder.from_shapes(views, style=part == "style_encoder")
        config = _unet_config_from_header(source)
        _, skips = enhance.build_input_blocks_shapes(config)
        if part == "warp_modules":
            return nn.ModuleList([enhance.WarpBlock(width) for width in reversed(skips)])
        mc = config.model_channels
        widths = [mc * config.channel_mult[level] for level in reversed(range(len(config.channel_mult)))
                  for _ in range(config.num_res_blocks + 1)]
        return nn.ModuleList([enhance.StyleModule(2 * width, config.time_embed_dim) for width in widths])


def load_enhance_modules(path: "str | os.PathLike[str]", parts: Sequence[str], dtype: torch.dtype = torch.float32,
                         device: "str | torch.device" = "cpu", needed_by: str = "this mode"):
    """The requested extra modules of a v1.5/v2 checkpoint (method-enhance §2), built from the file's shapes.

    ``parts``: names of :data:`ENHANCE_PARTS`. Only their tensors are read. A part that is absent, or a tensor
    with a missing key or the wrong shape, raises :class:`CheckpointError` naming the key (``needed_by`` says
    which mode wanted it). Returns :class:`lib_colorize.models.enhance.EnhanceModules` (not cast to fp32 rules:
    see :meth:`EnhanceModules.to`).
    """
    from .models.enhance import EnhanceModules

    unknown = [p for p in parts if p not in ENHANCE_PARTS]
    if unknown:
        raise ValueError(f"unknown enhance parts {unknown}; choose from {sorted(ENHANCE_PARTS)}")
    with _open(path) as source:
        info = _info_from_source(source)
        modules = EnhanceModules(version=info.version, path=source.path)
        for part in parts:
            prefix, what = ENHANCE_PARTS[part]
            if part == "lora":
                modules.lora = _load_lora(source, dtype, device)
                if not modules.lora:
                    raise CheckpointError(source.path, f"has no {what}, which {needed_by} needs")
                continue
            shapes = _part_shapes(source, part)
            if not shapes:
                raise CheckpointError(source.path, f"has no {what}, which {needed_by} needs")
            try:
                model = _build_enhance_part(source, part, shapes)
            except (KeyError, ValueError, IndexError) as error:
                raise CheckpointError(source.path, f"the {what} does not have the released layout "
                                                   f"(missing or odd key {error})") from None
            setattr(modules, part, _fill(source, prefix, model, shapes, what, dtype, device))
    return modules
