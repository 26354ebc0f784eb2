"""The Forge adapter tests' environment: which Forge 2 backend they drive (imported first by ``conftest.py``).

Which ``backend`` the tests drive is decided once, here, before anything imports it:

* ``forge``        ``CD_FORGE_DIR`` names a Forge 2 tree and its ``backend`` imports in this Python (run the tests
                   with Forge's own venv): everything is Forge's;
* ``forge-source`` ``CD_FORGE_DIR`` is set but Forge's dependencies are missing here (the pinned test venv): the
                   patch API files of the tree (``STAND_IN_FILES``) are loaded from it, over the stand-in's stubs of
                   memory management, attention and the like (``stand_in/README.md``);
* ``stand-in``     no ``CD_FORGE_DIR``: the stand-in alone.

``modules`` is the AUTOMATIC1111 stand-in of ``tests/adapter/stand_in`` (the names the adapter reads exist in Forge
too); tests add Forge's extra ``sd_models`` attributes where they need them.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAND_IN = HERE / "stand_in"
WEBUI_STAND_IN = REPO / "tests" / "adapter" / "stand_in"
FORGE_DIR_VARIABLE = "CD_FORGE_DIR"
#: Forge 2 backend files the stand-in stands for (the patch API, the U-Net and the VAE with their wrappers).
STAND_IN_FILES = ("sampling/condition.py", "sampling/sampling_function.py", "nn/unet.py", "nn/vae.py",
                  "modules/k_prediction.py", "modules/k_model.py", "patcher/base.py", "patcher/unet.py",
                  "patcher/vae.py")


class _TreeFiles(importlib.abc.MetaPathFinder):
    """Resolves ``backend.<file>`` of :data:`STAND_IN_FILES` to the file in the Forge tree."""

    def __init__(self, root: Path):
        self.modules = {"backend." + f[:-3].replace("/", "."): root / "backend" / f for f in STAND_IN_FILES}

    def find_spec(self, name, path=None, target=None):
        file = self.modules.get(name)
        return importlib.util.spec_from_file_location(name, file) if file is not None else None


def _purge_backend() -> None:
    for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
        del sys.modules[name]


def _choose_backend() -> tuple[str, str]:
    """``(mode, reason)``; sets up ``sys.path`` / ``sys.meta_path`` for it."""
    root_text = os.environ.get(FORGE_DIR_VARIABLE, "").strip()
    if root_text:
        root = Path(root_text).expanduser().resolve()
        if not (root / "backend" / "patcher" / "unet.py").is_file():
            raise RuntimeError(f"{FORGE_DIR_VARIABLE}={root_text} is not a Forge 2 tree (no backend/patcher/unet.py)")
        extra = [str(root), str(root / "packages_3rdparty"), str(root / "repositories" / "huggingface_guess")]
        sys.path[:0] = extra
        argv = sys.argv
        sys.argv = [argv[0], "--always-cpu"]   # Forge reads its flags at import; on CPU it needs this one
        try:
            import backend.patcher.unet  # noqa: F401
            import backend.sampling.sampling_function  # noqa: F401
            return "forge", f"Forge's own backend from {root}"
        except ImportError as error:
            reason = f"Forge's patch API files from {root} over the stand-in's stubs ({error} here)"
        finally:
            sys.argv = argv
        for path in extra:
            sys.path.remove(path)
        _purge_backend()
        sys.path.insert(0, str(STAND_IN))
        sys.meta_path.insert(0, _TreeFiles(root))
        return "forge-source", reason
    sys.path.insert(0, str(STAND_IN))
    return "stand-in", f"the stand-in ({FORGE_DIR_VARIABLE} not set: see README, Tests)"


for _path in (str(REPO), str(WEBUI_STAND_IN)):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)
BACKEND_MODE, BACKEND_REASON = _choose_backend()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CONTEXT_DIM = 32  # = the tiny OpenCLIP's embed_dim (reference tokens are the U-Net context)


def requires_forge_tree():
    if BACKEND_MODE == "stand-in":
        pytest.skip(f"{FORGE_DIR_VARIABLE} is not set (the root of a Forge 2 tree, see README: Tests)")
