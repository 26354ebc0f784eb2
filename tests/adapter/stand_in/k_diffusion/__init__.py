"""k-diffusion for the stand-in webui: PyPI's ``k-diffusion==0.1.1.post1`` files, without the package's ``__init__``.

The webui v1.10.1 clones crowsonkb/k-diffusion at ab527a9 ("Release 0.0.16") into ``repositories/k-diffusion`` and
imports ``k_diffusion.sampling`` (samplers, schedules, ``BrownianTreeNoiseSampler``) and ``k_diffusion.external``
(``CompVisDenoiser`` / ``CompVisVDenoiser`` over ``DiscreteSchedule``). The tests run the same code from PyPI:
``.ci/k-diffusion.txt`` installs the release with ``--no-deps``, and this package points its ``__path__`` at the
installed folder, so ``import k_diffusion.sampling`` loads PyPI's ``sampling.py`` while the release's own
``__init__`` (which imports the training and evaluation modules: clip, clean-fid, scikit-image, dctorch,
jsonmerge) never runs. The webui imports nothing from those modules.

PyPI 0.1.1.post1 against the pinned ab527a9, the files the webui uses:

* ``sampling.py``: identical (git blob 9f10e8d8 in both): every sampler, ``get_sigmas_*``, ``to_d``,
  ``get_ancestral_step``, ``default_noise_sampler``, ``BatchedBrownianTree`` / ``BrownianTreeNoiseSampler``.
* ``external.py``: identical (blob 79b51cec): ``DiscreteSchedule`` (``sigma_to_t``, ``t_to_sigma``, ``get_sigmas``,
  ``quantize``), ``DiscreteEpsDDPMDenoiser``, ``CompVisDenoiser``, ``DiscreteVDDPMDenoiser``, ``CompVisVDenoiser``.
* ``utils.py``: differs, but not in anything those two files use (they use only ``utils.append_dims``, unchanged):
  the release adds ``import safetensors`` and ``threading`` at import time (both present here), stratified
  sampling for the training-time ``rand_*`` distributions, ``ema_update`` via ``lerp_``, ``ConstantLRWithWarmup``,
  ``get_safetensors_metadata`` and ``ema_update_dict``.
* ``__init__.py``: identical; ``layers.py``, ``models/``, ``config.py``, ``evaluation.py``: differ (training only).

So the pinned behaviour *is* PyPI's here; ``tests/adapter/test_stand_in.py`` asserts the identity of the two files
with the webui's own ``repositories/k-diffusion`` checkout when ``CD_WEBUI_DIR`` is set, and pins the values the
pinned code produces. What the webui changes at run time is the webui's, and the stand-in does it the same way:
``k_diffusion.sampling.torch`` replaced by ``TorchHijack`` (``randn_like`` from the per-image RNG),
``k_diffusion.sampling.to_d`` replaced (``modules/sd_schedulers.py``), and torchsde's Brownian ``_randn`` seeded
per image (``modules/sd_samplers_common.py``).
"""
import importlib.metadata as _metadata
import os as _os


def _installed_folder() -> str:
    try:
        distribution = _metadata.distribution("k-diffusion")
    except _metadata.PackageNotFoundError:
        raise ImportError("the stand-in webui needs PyPI's k-diffusion: pip install --no-deps -r .ci/k-diffusion.txt "
                          "(bash .ci/run builds the test environment with it)") from None
    folder = str(distribution.locate_file("k_diffusion"))
    if not _os.path.isfile(_os.path.join(folder, "sampling.py")):
        raise ImportError(f"k-diffusion {distribution.version} is installed, but {folder} has no sampling.py")
    return folder


__path__ = [_installed_folder()]
__version__ = _metadata.version("k-diffusion")
