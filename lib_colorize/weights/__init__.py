"""Weight files: what each one is, where it lives, how it is fetched, and how it is read.

* :mod:`.files` -- :class:`WeightFile`, the record of one downloadable file (name, local name, folder, Hugging
  Face source, licence).
* :mod:`.catalog` -- every file the method uses: released checkpoints, OpenCLIP, line and mask extractors, the
  XL reference encoders.
* :mod:`.store` -- finding a file in a folder or the Hugging Face cache, the one offline check
  (``HF_HUB_OFFLINE``) and the one download (``huggingface_hub.hf_hub_download``), with the "missing" message
  that says what to put where.
* :mod:`.progress` -- download progress events for a callback the host supplies.
* :mod:`.folders` -- which models folder the command line uses.
* :mod:`.state_dict` -- reading plain weight files safely (``weights_only``), only the tensors needed.
"""
from .catalog import (CLIP_BIGG, CLIP_VIT_H, DEFAULT_CLIP_ARCH, WD_TAGGER, XL_WEIGHT_FILES, DEFAULT_CLIP_PRETRAINED, LINE_EXTRACTOR_FILES,
                      MASK_EXTRACTOR_FILES, RELEASED_CHECKPOINTS, clip_weight_file, find_checkpoint, released_checkpoint,
                      resolve_checkpoint)
from .files import WeightFile, format_bytes
from .folders import (CHECKPOINTS_FOLDER, ENV_MODELS_DIR, EXTENSION_FOLDER, ModelsRoot, models_root,
                      webui_models_folder)
from .progress import DownloadProgress, ProgressCallback, line_progress
from .state_dict import read_state_dict
from .store import (describe_location, download_weight_file, downloads_disabled, ensure_weight_file,
                    find_weight_file, hub_cache_dir, missing_weights)

__all__ = [
    "WeightFile", "format_bytes", "RELEASED_CHECKPOINTS", "CLIP_VIT_H", "DEFAULT_CLIP_ARCH", "DEFAULT_CLIP_PRETRAINED",
    "LINE_EXTRACTOR_FILES", "MASK_EXTRACTOR_FILES", "CLIP_BIGG", "WD_TAGGER", "XL_WEIGHT_FILES", "clip_weight_file", "released_checkpoint", "resolve_checkpoint", "find_checkpoint",
    "CHECKPOINTS_FOLDER", "EXTENSION_FOLDER", "ENV_MODELS_DIR", "ModelsRoot", "models_root", "webui_models_folder",
    "DownloadProgress", "ProgressCallback", "line_progress", "read_state_dict", "describe_location",
    "download_weight_file", "downloads_disabled", "ensure_weight_file", "find_weight_file", "hub_cache_dir",
    "missing_weights",
]
