"""The webui adapter of ColorizeDiffusion: the only package that imports the webui's ``modules``.

``scripts/colorize_diffusion.py`` is a thin ``Script`` over these modules:

* :mod:`cd_webui.ui`        the accordion (``build_ui``), infotext paste fields;
* :mod:`cd_webui.args`      script args (UI values, API dict / positional JSON, X/Y/Z ``p.cd_*``) -> options;
* :mod:`cd_webui.xyz`       X/Y/Z plot axes;
* :mod:`cd_webui.sampling`  the dual-guidance denoiser inside the webui's sampler;
* :mod:`cd_webui.model`     extension weights of the loaded checkpoint;
* :mod:`cd_webui.lifecycle` hook installation and removal;
* :mod:`cd_webui.api`       HTTP routes and the heat-map preview.

Nothing is imported here, so importing one submodule never pulls in the others.
"""
