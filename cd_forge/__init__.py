"""The Forge-family adapter of ColorizeDiffusion (Forge 2; the ``ldm_patched`` forks are refused clearly).

``scripts/colorize_diffusion.py`` asks :mod:`cd_forge.host` which webui family loaded it, then takes its Script
from :mod:`cd_webui.script` (AUTOMATIC1111) or :mod:`cd_forge.script` (the Forge family):

* :mod:`cd_forge.host`      which webui family hosts the extension (no import of the webui);
* :mod:`cd_forge.script`    the Script class and its registrations in Forge;
* :mod:`cd_forge.ui`        the Forge-only controls of the shared accordion (:mod:`cd_webui.ui`), the checkpoint arg;
* :mod:`cd_forge.model`     ColorizeDiffusion files in Forge: discovery, the checkpoint-list guard, our U-Net
                            (a Forge ``UnetPatcher``), VAE and sketch encoder under Forge's memory management;
* :mod:`cd_forge.sampling`  the patch points: conditioning modifier, model function wrapper, CFG function;
* :mod:`cd_forge.lifecycle` the script hooks.

The front end is shared with the AUTOMATIC1111 adapter: :mod:`cd_webui.ui` (accordion, infotext paste),
:mod:`cd_webui.args` (script args), :mod:`cd_webui.xyz` (X/Y/Z axes), :mod:`cd_webui.api` (visualize route), and
the OpenCLIP loading of :mod:`cd_webui.model`. Nothing is imported here.
"""
