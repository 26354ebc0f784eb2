"""Which webui family hosts the extension, decided from the import system alone (nothing of the webui is imported).

* ``a1111``       AUTOMATIC1111 (no ``modules_forge``);
* ``forge``       Forge 2 (``modules_forge`` and its ``backend`` package with ``backend.patcher.unet``);
* ``ldm_patched`` the forks that kept Forge 1's ``ldm_patched`` backend (reForge, Forge Classic):
                  ``modules_forge`` without ``backend.patcher.unet``.
"""
from __future__ import annotations

from importlib.util import find_spec

A1111, FORGE, LDM_PATCHED = "a1111", "forge", "ldm_patched"

#: What users of the forks are told (README "Forge": not supported yet).
LDM_PATCHED_MESSAGE = ("ColorizeDiffusion does not support this webui yet: it is a fork on Forge 1's ldm_patched "
                       "backend (reForge, Forge Classic). It supports AUTOMATIC1111 v1.10 and Forge 2 "
                       "(lllyasviel/stable-diffusion-webui-forge); see the README, section Forge.")


def _has(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):   # a missing parent package, or a module without __spec__
        return False


def family() -> str:
    """``a1111``, ``forge`` or ``ldm_patched``."""
    if not _has("modules_forge"):
        return A1111
    if _has("backend.patcher.unet"):
        return FORGE
    return LDM_PATCHED
