"""The ``Script`` of ColorizeDiffusion in the Forge family: every hook delegates to this package.

``scripts/colorize_diffusion.py`` imports :class:`ColorizeDiffusionScript` and calls :func:`register` each time
Forge (re)loads it. The accordion, its args, X/Y/Z axes and the visualize route are the AUTOMATIC1111 adapter's
(:mod:`cd_webui`), with the Forge-only checkpoint dropdown of :mod:`cd_forge.ui`. In the ldm_patched forks the
accordion is there but an enabled generation is refused with :data:`cd_forge.host.LDM_PATCHED_MESSAGE`.
"""
from modules import script_callbacks

import cd_webui.model as shared_model
from cd_webui import api, ui as shared_ui, xyz
from cd_webui.script import TITLE, DelegatingScript

from . import lifecycle, model, ui
from .host import LDM_PATCHED, LDM_PATCHED_MESSAGE, family

__all__ = ["TITLE", "ColorizeDiffusionScript", "register"]


def register() -> None:
    """Import-time registration, as in AUTOMATIC1111 (X/Y/Z axes before X/Y/Z's ui() runs; Forge clears callbacks
    before it re-imports scripts). In Forge 2 also the checkpoint-list guard and the memory placement of our
    modules."""
    xyz.register_xyz_axes()
    script_callbacks.on_ui_settings(shared_model.on_ui_settings)
    script_callbacks.on_app_started(api.on_app_started)
    script_callbacks.on_script_unloaded(lifecycle.on_script_unloaded)
    if family() == LDM_PATCHED:
        print(LDM_PATCHED_MESSAGE)
        return
    model.install_checkpoint_guard()
    shared_model.placement = model.forge_placement


class ColorizeDiffusionScript(DelegatingScript):
    """The Forge script: the shared accordion with the Forge notice and checkpoint dropdown; Forge's hooks."""

    lifecycle = lifecycle

    def build_ui(self, is_img2img):
        return shared_ui.build_ui(self, is_img2img, notice=ui.NOTICE, host_controls=ui.host_controls)
