"""Forge adapter tests: ``cd_forge`` on Forge 2's patch API (real where it imports, else a stand-in).

``forge_env`` chooses the backend before anything imports it (see there); the fixtures are here.
"""
from __future__ import annotations

from . import forge_env  # noqa: F401 - first: it chooses the backend
import pytest

from .forge_env import BACKEND_REASON, CONTEXT_DIM


def pytest_report_header(config):
    return f"Forge adapter tests on {BACKEND_REASON}"


# ------------------------------------------------------------------------------------------------- files
def _tiny_checkpoint(tmp_path_factory, name: str, version: str, seed: int) -> str:
    from lib_colorize.testing.checkpoints import make_checkpoint

    path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    return make_checkpoint(str(path), version=version, size="tiny", context_dim=CONTEXT_DIM, seed=seed)


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory) -> str:
    """A tiny ColorizeDiffusion v1 checkpoint in the released layout (eps by its name)."""
    return _tiny_checkpoint(tmp_path_factory, "mult-eps-tiny", "v1", 1)


@pytest.fixture(scope="session")
def v_checkpoint_file(tmp_path_factory) -> str:
    """A tiny v2 checkpoint (v-prediction), with the v2 extra modules our U-Net ignores."""
    return _tiny_checkpoint(tmp_path_factory, "v2-tiny", "v2", 2)


@pytest.fixture
def colorize(checkpoint_file):
    """Our models of the tiny checkpoint (built fresh for each test, released afterwards)."""
    from cd_forge import model

    model.release_colorize_model()
    yield model.load_colorize_model(checkpoint_file)
    model.release_colorize_model()


_built: dict = {}


@pytest.fixture(autouse=True)
def built_once(monkeypatch):
    """Forge models of a file are built once per session (the adapter's own caching and release still run: only
    the construction is shared; nothing in them changes between tests, and the tests check no hook is left)."""
    from cd_forge import model

    def once(name, build):
        def cached(path, *args):
            key = (name, path) + args
            if key not in _built:
                _built[key] = build(path, *args)
            return _built[key]
        return cached

    for name in ("build_unet", "build_vae", "build_sketch_encoder"):
        monkeypatch.setattr(model, name, once(name, getattr(model, name)))
