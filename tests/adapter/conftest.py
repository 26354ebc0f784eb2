"""Adapter tests: the webui adapter (``cd_webui``, ``scripts/``) against a stand-in ``modules`` package.

``stand_in/`` goes first on ``sys.path`` so that ``import modules`` finds the stand-in (webui-integration §8), never
a real webui, and ``import ldm`` / ``import k_diffusion`` find the stand-in's ldm U-Net and PyPI's k-diffusion. The
model is loaded from a tiny random checkpoint in the released key layout; OpenCLIP is a tiny registered architecture
with the token geometry of ViT-H/14.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAND_IN = HERE / "stand_in"
for path in (str(REPO), str(STAND_IN)):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(1)

CONTEXT_DIM = 32  # = the tiny OpenCLIP's embed_dim (reference tokens are the U-Net context)

#: The root of a real webui v1.10.1 tree (82a973c0, with its ``repositories/``); the tests that read the real
#: webui's source run when it is set and skip otherwise (README, Tests).
WEBUI_DIR_VARIABLE = "CD_WEBUI_DIR"


def real_webui_path(relative: str) -> Path:
    """``relative`` inside the real webui tree named by ``CD_WEBUI_DIR``; skips the test when the variable is not
    set, fails it when the variable names a tree without that file."""
    root = os.environ.get(WEBUI_DIR_VARIABLE, "").strip()
    if not root:
        pytest.skip(f"{WEBUI_DIR_VARIABLE} is not set (the root of a webui v1.10.1 tree, see README: Tests)")
    path = Path(root).expanduser() / relative
    if not path.exists():
        pytest.fail(f"{WEBUI_DIR_VARIABLE}={root} has no {relative}: not a webui v1.10.1 tree")
    return path


def load_real_webui_module(relative: str, name: str):
    """The real webui's module at ``relative`` (e.g. ``modules/sd_schedulers.py``), executed under ``name`` over the
    stand-in's other modules (``from modules import shared`` finds the stand-in's)."""
    spec = importlib.util.spec_from_file_location(name, real_webui_path(relative))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # as an import does (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def real_webui_source_tree(relative: str) -> ast.Module:
    """The parsed source of the real webui's file at ``relative``."""
    return ast.parse(real_webui_path(relative).read_text(encoding="utf-8"))


def real_webui_functions(relative: str, names, namespace: dict) -> dict:
    """The webui's own functions (``name`` or ``Class.method``), compiled from its source into ``namespace``."""
    tree = real_webui_source_tree(relative)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    functions = {}
    for name in names:
        node = found[name]
        node.decorator_list = []
        code = compile(ast.Module(body=[node], type_ignores=[]), f"{relative}:{name}", "exec")
        exec(code, namespace)  # noqa: S102 - the webui's own source, read from CD_WEBUI_DIR
        functions[name] = namespace[node.name]
    return functions


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory) -> str:
    """A tiny ColorizeDiffusion v1 checkpoint in the released layout (name with "eps", like mult-eps-ft)."""
    from lib_colorize.testing.checkpoints import make_checkpoint

    folder = tmp_path_factory.mktemp("Stable-diffusion")
    return make_checkpoint(str(folder / "mult-eps-tiny.safetensors"), version="v1", size="tiny",
                           context_dim=CONTEXT_DIM, seed=1)


@pytest.fixture(scope="session")
def plain_sd_file(tmp_path_factory) -> str:
    from lib_colorize.testing.checkpoints import make_sd_checkpoint

    return make_sd_checkpoint(str(tmp_path_factory.mktemp("plain") / "sd21-tiny.safetensors"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``--data-dir`` of the stand-in webui, with tiny OpenCLIP weights in models/ColorizeDiffusion."""
    from lib_colorize.testing.clip import make_tiny_clip_weights, register_tiny_clip

    register_tiny_clip()
    root = tmp_path_factory.mktemp("webui-data")
    make_tiny_clip_weights(str(root / "models" / "ColorizeDiffusion" / "open_clip_pytorch_model.safetensors"),
                           seed=3)
    return root


# ------------------------------------------------------------------------------------------------ webui
def _load_script_module():
    """Import scripts/colorize_diffusion.py as the webui does (module named by file name)."""
    path = REPO / "scripts" / "colorize_diffusion.py"
    spec = importlib.util.spec_from_file_location("colorize_diffusion.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def webui(data_dir, monkeypatch):
    """A fresh stand-in webui with the extension's script imported; yields a small namespace of helpers."""
    from lib_colorize.processors import live_count, remove_all
    from lib_colorize.testing.clip import TINY_CLIP_NAME
    from modules import errors, modelloader, paths, script_callbacks, sd_models_config, sd_samplers_common, shared

    import cd_webui.model as cd_model

    script_callbacks.clear_callbacks()
    shared.opts.reset()
    shared.state.reset()
    shared.sd_model = None
    shared.cmd_opts.colorize_dir = None
    shared.cmd_opts.lowvram = shared.cmd_opts.medvram = False
    errors.reported.clear()
    modelloader.requested.clear()
    sd_samplers_common.stored_latents.clear()
    monkeypatch.setattr(paths, "models_path", str(data_dir / "models"))
    monkeypatch.setattr(cd_model, "CLIP_ARCH", TINY_CLIP_NAME)
    cd_model.clear_caches(clip_too=True)
    original_resolver = sd_models_config.find_checkpoint_config
    module = _load_script_module()
    script_callbacks.ui_settings_callback()
    yield WebUI(module)
    remove_all()
    assert live_count() == 0
    sd_models_config.find_checkpoint_config = getattr(sd_models_config.find_checkpoint_config,
                                                      "colorize_original", original_resolver)
    script_callbacks.clear_callbacks()
    shared.state.reset()


class WebUI:
    """Helpers over the stand-in webui: load a model, build ``p`` objects with our script's args, run them."""

    def __init__(self, module):
        from cd_webui.args import UI_ORDER

        self.module = module
        self.num_args = len(UI_ORDER)

    def load(self, path: str):
        from modules import sd_models

        return sd_models.load_model(path)

    def runner(self, is_img2img: bool = False, with_script: bool = True):
        from modules import scripts

        runner = scripts.ScriptRunner()
        if with_script:
            script = self.module.ColorizeDiffusionScript()
            script.filename = "colorize_diffusion.py"
            runner.add(script, self.num_args, is_img2img=is_img2img)
        return runner

    def script_args(self, options: dict | None):
        """Script args in the named form (``args[0]`` = dict), padded like the webui pads API args."""
        return [0, dict(options) if options is not None else {"enabled": False}] + [None] * (self.num_args - 1)

    def txt2img(self, options: dict | None = None, with_script: bool = True, **kwargs):
        from modules import processing

        kwargs.setdefault("sampler_name", "Euler")
        kwargs.setdefault("steps", 3)
        kwargs.setdefault("seed", 1234)
        return processing.StableDiffusionProcessingTxt2Img(
            scripts=self.runner(False, with_script), script_args=self.script_args(options), **kwargs)

    def img2img(self, options: dict | None = None, with_script: bool = True, **kwargs):
        from modules import processing

        kwargs.setdefault("sampler_name", "Euler")
        kwargs.setdefault("steps", 4)
        kwargs.setdefault("seed", 1234)
        return processing.StableDiffusionProcessingImg2Img(
            scripts=self.runner(True, with_script), script_args=self.script_args(options), **kwargs)

    @staticmethod
    def run(p):
        from modules import processing

        return processing.process_images(p)


@pytest.fixture
def sd_model(webui, checkpoint_file):
    return webui.load(checkpoint_file)


# ------------------------------------------------------------------------------------------------ images
def sketch_image(size=(80, 64)) -> Image.Image:
    """Black line art on white paper."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 6, h // 6, 5 * w // 6, 5 * h // 6), outline=(0, 0, 0), width=3)
    draw.line((0, h // 2, w, h // 2), fill=(0, 0, 0), width=2)
    return image


def reference_image(size=(48, 64)) -> Image.Image:
    image = Image.new("RGB", size, (30, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((5, 5, size[0] // 2, size[1] // 2), fill=(220, 40, 40))
    return image


@pytest.fixture
def sketch():
    return sketch_image()


@pytest.fixture
def reference():
    return reference_image()
