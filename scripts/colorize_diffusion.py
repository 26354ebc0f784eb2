"""ColorizeDiffusion for the AUTOMATIC1111 webui: sketch colorization after a reference image.

A thin ``Script``: every hook delegates to the ``cd_webui`` package (the method itself is ``lib_colorize``).
The title is the API name (``alwayson_scripts: {"ColorizeDiffusion": {"args": [...]}}``); keep it constant.
"""
from modules import script_callbacks, scripts

from cd_webui import api, lifecycle, model, ui, xyz
from cd_webui import enhance_ui

TITLE = "ColorizeDiffusion"

# Import-time registration (webui-integration §6: X/Y/Z axes must exist before X/Y/Z's ui() runs, also with
# --nowebui). The webui clears callbacks before it re-imports scripts, so nothing is registered twice.
xyz.register_xyz_axes()
model.install_config_resolver()
script_callbacks.on_ui_settings(model.on_ui_settings)
script_callbacks.on_model_loaded(model.on_model_loaded)
script_callbacks.on_app_started(api.on_app_started)
script_callbacks.on_script_unloaded(lifecycle.on_script_unloaded)
script_callbacks.on_after_component(enhance_ui.on_after_component)   # the checkpoint dropdown drives the section


class ColorizeDiffusionScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.build_ui(self, is_img2img)

    def after_component(self, component, **kwargs):
        if kwargs.get("elem_id") == "setting_sd_model_checkpoint":
            ui.bind_checkpoint_dropdown(self, component)

    def before_process(self, p, *args):
        lifecycle.before_process(p, *args)

    def process(self, p, *args):
        lifecycle.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        lifecycle.process_before_every_sampling(p, *args, **kwargs)

    def postprocess_image(self, p, pp, *args):
        lifecycle.postprocess_image(p, pp, *args)

    def postprocess(self, p, processed, *args):
        lifecycle.postprocess(p, processed, *args)
