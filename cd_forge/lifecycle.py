"""Per-generation state and hooks of the ColorizeDiffusion script in Forge 2.

The option handling, infotext, the ``p.sample`` wrapper that raises the user's errors and always removes the
processors, "Crop result" and the extra gallery images are the AUTOMATIC1111 adapter's (:mod:`cd_webui.lifecycle`);
what differs is where the model comes from and how sampling is entered:

============================  ================================================================================
script hook                   what happens in Forge
============================  ================================================================================
``before_process``            as in AUTOMATIC1111; our U-Net / VAE left in ``forge_objects`` by a crashed earlier
                              run are given back to the host
``process``                   the shared parsing, infotext and validation; then our models of the chosen
                              ColorizeDiffusion file (:mod:`cd_forge.model`), the host check, the reference
                              tokens, and our VAE in ``forge_objects`` (img2img encodes its init images next)
``process_before_every_sampling``  per pass (hires fix: the call Forge makes before its reset is skipped): a clone
                              of our U-Net with the other extensions' patches carried over (or a clear conflict),
                              the pass's plan and processors, our three patches (:mod:`cd_forge.sampling`); the
                              host's U-Net leaves the GPU; the clone and our VAE go into ``forge_objects``
``postprocess``               as in AUTOMATIC1111, then the host's U-Net and VAE go back into ``forge_objects``
============================  ================================================================================

Disabled: nothing is touched, unless Forge's own checkpoint list names a ColorizeDiffusion file, which Forge
cannot run as its main model (:mod:`cd_forge.model` keeps the host loaded): the generation is refused with a
message rather than silently made with the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from cd_webui import lifecycle as shared_lifecycle
from cd_webui.lifecycle import GenerationState, get_state
from lib_colorize import processors as unet_processors
from lib_colorize.errors import ColorizeError, InvalidInput, NotColorizeModel

from . import model, sampling
from .host import LDM_PATCHED, LDM_PATCHED_MESSAGE, family
from .model import AUTOMATIC, INFOTEXT_CHECKPOINT
from .ui import split_args


@dataclass
class ForgeGenerationState(GenerationState):
    """:class:`cd_webui.lifecycle.GenerationState` plus our models and the current pass's patches."""

    colorize: Optional[model.ColorizeModel] = None
    forge_pass: Optional[sampling.ForgePass] = None


def restore_host_objects(p) -> None:
    """Give ``forge_objects`` the host's U-Net and VAE back where ours are (idempotent)."""
    sd_model = getattr(p, "sd_model", None)
    objects = getattr(sd_model, "forge_objects", None)
    colorize = model.loaded_colorize_model()
    if objects is None or colorize is None:
        return
    host = sd_model.forge_objects_after_applying_lora
    if colorize.owns(objects.unet):
        objects.unet = host.unet
    if objects.vae is colorize.vae:
        objects.vae = host.vae


# ------------------------------------------------------------------------------------------ before_process
def before_process(p, *args) -> None:
    shared_lifecycle.before_process(p, *args)
    restore_host_objects(p)


# ------------------------------------------------------------------------------------------------- process
def process(p, *args) -> None:
    args, choice = split_args(args)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params.pop(INFOTEXT_CHECKPOINT, None)
    shared_lifecycle.process(p, *args, prepare=functools.partial(_prepare, choice=choice),
                             state_type=ForgeGenerationState)
    if get_state(p) is None:
        _refuse_colorize_file_as_main_model(p)


def _refuse_colorize_file_as_main_model(p) -> None:
    if family() == LDM_PATCHED:
        return
    chosen = model.webui_choice()
    if chosen is None:
        return
    host = getattr(getattr(p.sd_model, "sd_checkpoint_info", None), "name", "the host checkpoint")
    state = ForgeGenerationState(is_img2img=shared_lifecycle.is_img2img(p))
    state.error = NotColorizeModel(
        f"ColorizeDiffusion: {model.checkpoint_name(chosen)} is a ColorizeDiffusion checkpoint, which Forge cannot "
        f"run as its main model (Forge keeps {host} loaded instead). Enable the ColorizeDiffusion accordion to "
        "colorize with it, or choose another checkpoint")
    setattr(p, shared_lifecycle.STATE_ATTR, state)
    shared_lifecycle._wrap_sample(p, state)


def _prepare(p, state: ForgeGenerationState, choice: Any = AUTOMATIC) -> None:
    """Validation and everything that does not depend on the sampling size (once per generation)."""
    if family() == LDM_PATCHED:
        raise ColorizeError(LDM_PATCHED_MESSAGE)
    shared_lifecycle._check_supported(p)
    colorize = model.load_colorize_model(model.resolve_checkpoint(choice))
    state.colorize, state.info = colorize, colorize.info
    shared_lifecycle.check_model_options(state.options, colorize.info)
    if state.options.enhanced:
        # InvalidInput adds the "ColorizeDiffusion: <key>:" prefix; the key is the mode that was asked for
        key = next(name for name in ("bg_enhance", "fg_enhance", "style_enhance") if getattr(state.options, name))
        raise InvalidInput(key, model.FORGE_UNSUPPORTED.format(what="the enhance modes (BG / FG / style enhance)",
                                                               verb="run"))
    model.require_host(p.sd_model, colorize)
    p.extra_generation_params[INFOTEXT_CHECKPOINT] = colorize.name
    shared_lifecycle.prepare_conditioning(state, colorize.diffusion_model, dtype=colorize.computation_dtype)
    # img2img encodes its init images before the first pass, with forge_objects.vae
    p.sd_model.forge_objects.vae = colorize.vae


# -------------------------------------------------------------------------------- process_before_every_sampling
def process_before_every_sampling(p, *args, **kwargs) -> None:
    state = get_state(p)
    if state is None or state.options is None or state.error is not None:
        return   # disabled, or an error that the p.sample wrapper raises
    found = p.sd_model.forge_objects.unet
    if state.colorize.owns(found):
        return   # hires fix: Forge calls the hook again right before it resets the U-Net; the next call is ours
    state.release()   # the previous pass's processors
    try:
        _prepare_pass(p, state, kwargs.get("x"), found)
    except Exception as error:  # noqa: BLE001 - raised by the first step and by the p.sample wrapper
        state.release()
        state.error = error
        _fail_at_first_step(p, found, error)


def _prepare_pass(p, state: ForgeGenerationState, x, found) -> None:
    from backend import memory_management
    from backend.sampling.condition import ConditionCrossAttn

    if x is None:
        raise RuntimeError("ColorizeDiffusion: process_before_every_sampling got no latent")
    colorize = state.colorize
    host = p.sd_model.forge_objects_after_applying_lora.unet
    unet = colorize.unet.clone()
    sampling.carry_over(unet, found, host)
    plan, processors = shared_lifecycle.prepare_pass(
        p, state, x, colorize.diffusion_model, colorize.sketch_encoder, colorize.encode_posterior,
        vae_dtype=colorize.vae.vae_dtype, device=memory_management.get_torch_device(),
        dtype=colorize.computation_dtype)
    state.forge_pass = sampling.ForgePass(plan, processors, colorize.predictor)
    sampling.install(unet, state.forge_pass, ConditionCrossAttn)
    model.offload_host_unet(host)
    p.sd_model.forge_objects.unet = unet
    p.sd_model.forge_objects.vae = colorize.vae


def _fail_at_first_step(p, found, error: BaseException) -> None:
    """Stop the pass at its first step (rather than sampling it with the host's U-Net for nothing)."""
    def raise_error(*args):
        raise error

    unet = found.clone()
    unet.add_conditioning_modifier(raise_error)
    p.sd_model.forge_objects.unet = unet


# ------------------------------------------------------------------------------------------------ postprocess
postprocess_image = shared_lifecycle.postprocess_image


def postprocess(p, processed, *args) -> None:
    shared_lifecycle.postprocess(p, processed, *args)
    restore_host_objects(p)


def on_script_unloaded() -> None:
    import cd_webui.model as shared_model

    unet_processors.remove_all()
    if family() != LDM_PATCHED:
        model.uninstall_checkpoint_guard()
    shared_model.placement = None
    model.release_colorize_model()
