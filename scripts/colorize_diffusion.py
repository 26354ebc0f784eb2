"""ColorizeDiffusion for the AUTOMATIC1111 webui and Forge: sketch colorization after a reference image.

A thin entry point: it asks which webui family loaded it (once per load; importing it never fails on either
family) and takes that family's ``Script`` and registrations: :mod:`cd_webui.script` (AUTOMATIC1111) or
:mod:`cd_forge.script` (Forge 2; the ldm_patched forks get a clear "not supported yet"). The method itself is
``lib_colorize``.
"""
from cd_forge.host import A1111, family

HOST = family()
if HOST == A1111:
    from cd_webui.script import TITLE, ColorizeDiffusionScript, register
else:
    from cd_forge.script import TITLE, ColorizeDiffusionScript, register

register()
