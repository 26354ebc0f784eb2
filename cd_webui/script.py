"""The ``Script`` of ColorizeDiffusion in AUTOMATIC1111: every hook delegates to this package.

``scripts/colorize_diffusion.py`` imports :class:`ColorizeDiffusionScript` and calls :func:`register` each time
the webui (re)loads it. The title is the API name (``alwayson_scripts: {"ColorizeDiffusion": {"args": [...]}}``);
keep it constant.
"""
from modules import script_callbacks, scripts

from cd_webui import api, enhance_ui, lifecycle, model, ui, xyz

TITLE = "ColorizeDiffusion"


def register() -> None:
    """Import-time registration (webui-integration §6: X/Y/Z axes must exist before X/Y/Z's ui() runs, also with
    --nowebui). The webui clears callbacks before it re-imports scripts, so nothing is registered twice."""
    xyz.register_xyz_axes()
    model.install_config_resolver()
    script_callbacks.on_ui_settings(model.on_ui_settings)
    script_callbacks.on_model_loaded(model.on_model_loaded)
    script_callbacks.on_app_started(api.on_app_started)
    script_callbacks.on_script_unloaded(lifecycle.on_script_unloaded)
    script_callbacks.on_after_component(enhance_ui.on_after_component)   # the checkpoint dropdown drives the section
    script_callbacks.on_before_ui(enhance_ui.on_before_ui)


class DelegatingScript(scripts.Script):
    """An AlwaysVisible ``ColorizeDiffusion`` script whose hooks delegate to the module ``lifecycle`` (this
    package's, or another host adapter's) and whose ``ui`` is :meth:`build_ui`."""

    lifecycle = lifecycle

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def build_ui(self, is_img2img):
        return ui.build_ui(self, is_img2img)

    def ui(self, is_img2img):
        return self.build_ui(is_img2img)

    def before_process(self, p, *args):
        self.lifecycle.before_process(p, *args)

    def process(self, p, *args):
        self.lifecycle.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.lifecycle.process_before_every_sampling(p, *args, **kwargs)

    def postprocess_image(self, p, pp, *args):
        self.lifecycle.postprocess_image(p, pp, *args)

    def postprocess(self, p, processed, *args):
        self.lifecycle.postprocess(p, processed, *args)


class ColorizeDiffusionScript(DelegatingScript):
    """The AUTOMATIC1111 script."""

    def after_component(self, component, **kwargs):
        if kwargs.get("elem_id") == "setting_sd_model_checkpoint":   # the accordion adapts to the loaded model
            ui.bind_checkpoint_dropdown(self, component)
