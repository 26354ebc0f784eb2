"""A minimal stand-in for the AUTOMATIC1111 webui's ``modules`` package (webui-integration §8).

Written for the adapter tests from the integration notes, not copied from the webui: it reproduces the contracts
the extension relies on (script runner and hook order, exception swallowing, ``CFGDenoiser.forward``'s
interface, samplers creating a fresh denoiser per pass, mask blending, callbacks, interrupt) over models built
from ``lib_colorize`` and a tiny random checkpoint. ``tests/adapter/conftest.py`` puts its parent folder first on
``sys.path``.
"""
