"""A minimal stand-in for the AUTOMATIC1111 webui's ``modules`` package (webui-integration §8).

Written for the adapter tests, not copied from the webui: it reproduces the contracts the extension relies on
(script runner and hook order, exception swallowing, ``CFGDenoiser.forward``'s interface, samplers creating a fresh
denoiser per pass, mask blending, callbacks, interrupt) with the webui v1.10.1's structure where the extension
meets real code:

* samplers: PyPI's k-diffusion (``k_diffusion.sampling`` functions, ``k_diffusion.external.CompVisDenoiser``)
  driven as ``sd_samplers_kdiffusion`` / ``sd_samplers_common`` drive them (sampler table, schedule types,
  ``TorchHijack`` noise, Brownian-tree noise for SDE samplers); DDIM as ``sd_samplers_timesteps(_impl)``;
* the U-Net: ldm's ``openaimodel.UNetModel`` (the stand-in ``ldm`` package beside this one) built from the YAML the
  config resolver picks, with the webui's class-level cross-attention optimisation (``sd_hijack_optimizations``).

Nothing here uses ``lib_colorize``'s samplers, schedule or U-Net; the VAE is ``lib_colorize``'s. ``tests/adapter/
conftest.py`` puts the parent folder first on ``sys.path``.
"""
