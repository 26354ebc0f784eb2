"""Stand-in ``modules.scripts``: the ``Script`` base class and a runner with the webui's calling convention.

The runner slices ``p.script_args[args_from:args_to]`` for each script, calls only the hooks a script overrides,
and -- like the webui -- catches every ``Exception`` a hook raises and reports it (``modules.errors.reported``)
instead of propagating it.
"""
from __future__ import annotations

import os
from collections import namedtuple

from modules import errors

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def on_mask_blend(self, p, mba, *args):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        title = "".join(c for c in self.title().lower().replace(" ", "_") if c.isalnum() or c == "_")
        return f"script_{tab}_{title}_{item_id}"


ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []
current_basedir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def basedir():
    return current_basedir


class ScriptRunner:
    """Runs the AlwaysVisible scripts' hooks in the webui's order, swallowing and reporting exceptions."""

    def __init__(self):
        self.alwayson_scripts: list = []

    def add(self, script: Script, num_args: int, is_img2img: bool = False) -> Script:
        start = 1 + sum(s.args_to - s.args_from for s in self.alwayson_scripts)
        script.args_from, script.args_to = start, start + num_args
        script.alwayson = True
        script.is_img2img, script.is_txt2img = is_img2img, not is_img2img
        self.alwayson_scripts.append(script)
        return script

    def _call(self, method, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(type(script), method) is getattr(Script, method):
                continue  # the webui calls only overridden hooks
            try:
                args = p.script_args[script.args_from:script.args_to]
                getattr(script, method)(p, *extra, *args, **kwargs)
            except Exception:  # noqa: BLE001 - the webui swallows it
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._call("before_process", p)

    def process(self, p):
        self._call("process", p)

    def before_process_batch(self, p, **kwargs):
        self._call("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._call("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._call("before_hr", p)

    def on_mask_blend(self, p, mba):
        self._call("on_mask_blend", p, mba)

    def post_sample(self, p, ps):
        self._call("post_sample", p, ps)

    def postprocess_batch(self, p, images, **kwargs):
        self._call("postprocess_batch", p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        self._call("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)
