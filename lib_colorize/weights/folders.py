"""Which models folder the command line and the host-free pipeline use.

In order: the folder given (``--models-dir``); the ``COLORIZE_MODELS_DIR`` environment variable; the webui's
``models`` folder when this code runs from a webui's ``extensions/`` folder; otherwise the Hugging Face cache.
A models folder holds checkpoints in ``Stable-diffusion/`` and the extension's own weights (OpenCLIP, line
extractors) in ``ColorizeDiffusion/``, as in the webui. In the Hugging Face cache every file keeps its hub
repository and name, and a file already there (fetched by any tool) is used as it is.

The webui adapter does not use this: it takes the webui's own models folder (``cd_webui.model.models_dir``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .store import hub_cache_dir

ENV_MODELS_DIR = "COLORIZE_MODELS_DIR"
CHECKPOINTS_FOLDER = "Stable-diffusion"
EXTENSION_FOLDER = "ColorizeDiffusion"

#: lib_colorize/ -> <extension>/ -> extensions/ -> <webui>/
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelsRoot:
    """The models folder in use (``path`` None: the Hugging Face cache) and why it was chosen."""

    path: Optional[Path]
    chosen_by: str

    def folder(self, sub_folder: str) -> Optional[Path]:
        """``<root>/<sub_folder>``, or None for the hub cache (files are then looked up by their hub name)."""
        return None if self.path is None else self.path / sub_folder

    def describe(self) -> str:
        if self.path is None:
            return f"{hub_cache_dir()} (the Hugging Face cache)"
        return f"{self.path} ({self.chosen_by})"


def webui_models_folder(package_dir: Path = _PACKAGE_DIR) -> Optional[Path]:
    """``<webui>/models`` when ``package_dir`` lies in ``<webui>/extensions*/<extension>/``, else None."""
    extension = package_dir.parent
    extensions = extension.parent
    webui = extensions.parent
    if extensions.name.startswith("extensions") and (webui / "modules").is_dir() and (webui / "models").is_dir():
        return webui / "models"
    return None


def models_root(given: "str | os.PathLike[str] | None" = None, environ: Optional[Mapping[str, str]] = None,
                package_dir: Path = _PACKAGE_DIR) -> ModelsRoot:
    """The models folder by the documented order (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if given:
        return ModelsRoot(Path(os.path.abspath(os.path.expanduser(os.fspath(given)))), "--models-dir")
    if environ.get(ENV_MODELS_DIR):
        return ModelsRoot(Path(os.path.abspath(os.path.expanduser(environ[ENV_MODELS_DIR]))), f"${ENV_MODELS_DIR}")
    webui = webui_models_folder(package_dir)
    if webui is not None:
        return ModelsRoot(webui, "the webui's models folder")
    return ModelsRoot(None, "the Hugging Face cache")


__all__ = ["ENV_MODELS_DIR", "CHECKPOINTS_FOLDER", "EXTENSION_FOLDER", "ModelsRoot", "models_root",
           "webui_models_folder"]
