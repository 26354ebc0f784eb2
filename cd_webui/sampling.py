"""The dual-guidance denoiser inside the webui's sampler (webui-integration §2.5, option B).

:func:`bind` gives one sampler's ``CFGDenoiser`` instance (``p.sampler.model_wrap_cfg``; a fresh one for every
sampling pass, so nothing has to be restored) our :func:`colorize_forward`. It keeps the webui's contract:

1. interrupt / skip raise ``sd_samplers_common.InterruptedException`` (the sampler returns the last latent);
2. the U-Net timestep: ``inner_model.sigma_to_t(sigma)`` for k-diffusion (and LCM); for the timestep samplers
   (DDIM, PLMS, UniPC) ``sigma`` already *is* the timestep;
3. img2img/inpaint mask blending exactly as the webui: before denoising when ``mask_before_denoising``
   (timestep samplers), else after, each time through the scripts' ``on_mask_blend``;
4. ``cfg_denoiser`` / ``cfg_denoised`` / ``cfg_after_cfg`` callbacks; ``sampler.last_latent`` (the guided x0) and
   the live preview (``store_latent``) of what ``opts.live_preview_content`` asks for (:func:`preview_latent`);
   ``self.step += 1``.

The guidance itself is :func:`lib_colorize.denoiser.guided_call`, shared with the host-free pipeline, over
``inner_model(x_in, sigma_in, ctx) = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [ctx], "c_concat":
[image_cond rows]})``; for the XL models (sgm's ``DiffusionEngine``) ``inner_model(x_in, sigma_in, ctx, y)`` with
``cond={"crossattn": ctx, "vector": y}``, which sgm's ``OpenAIWrapper`` hands to the U-Net as ``context`` and ``y``
(method-xl §10.1-10.3): our context and 512-wide ``y`` in every pass, never the webui's text conds. The prompt conds, ``cond_scale``, NGMS/skip-early-CFG and the refiner are not used while
ColorizeDiffusion is active (the reference replaces the prompt; the refiner is refused in ``process``).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lib_colorize.denoiser import GenerationPlan, guided_call, k_noised_reference
from lib_colorize.guidance import COND, REF_DROPPED, SKETCH_DROPPED
from lib_colorize.processors import ProcessorSet


@dataclass
class SamplingContext:
    """What the forward needs for one sampling pass (made by :mod:`cd_webui.lifecycle`)."""

    plan: Optional[GenerationPlan] = None
    processors: Optional[ProcessorSet] = None
    error: Optional[BaseException] = None     # a preparation failure, raised by the first forward call

    @property
    def stats(self) -> dict:
        """The plan's U-Net call counters (empty before a plan is prepared)."""
        return self.plan.stats if self.plan is not None else {}


def is_timestep_denoiser(denoiser) -> bool:
    """DDIM / PLMS / UniPC (``CFGDenoiserTimesteps``): ``sigma`` is the timestep and the output is eps."""
    try:
        from modules.sd_samplers_timesteps import CFGDenoiserTimesteps

        if isinstance(denoiser, CFGDenoiserTimesteps):
            return True
    except ImportError:  # pragma: no cover - every webui v1.6+ has it
        pass
    return getattr(denoiser.inner_model, "sigma_to_t", None) is None


def timestep_of(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    if is_timestep_denoiser(denoiser):
        return sigma
    return denoiser.inner_model.sigma_to_t(sigma)


def alphas_cumprod_of(denoiser) -> torch.Tensor:
    alphas = getattr(denoiser, "alphas", None)
    if alphas is None:
        from modules import shared

        alphas = shared.sd_model.alphas_cumprod
    return alphas


def make_noised_reference(denoiser):
    """The injection pass's input in the sampler's space (method §6.2, webui-integration §2.5 step 6)."""
    if is_timestep_denoiser(denoiser):
        alphas = alphas_cumprod_of(denoiser)

        def noised(latent: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            index = t.reshape(-1)[:1].round().long().clamp(0, alphas.shape[0] - 1).to(alphas.device)
            a = alphas[index].to(device=latent.device, dtype=torch.float32).view(-1, 1, 1, 1)
            return (a.sqrt() * latent.float() + (1 - a).sqrt() * noise.float()).to(latent.dtype)
    else:
        noised = k_noised_reference(denoiser.inner_model.sigmas, denoiser.inner_model.sigma_to_t)
    return noised


class _InnerModel:
    """``inner_model(x_in, sigma_in, ctx)`` for :func:`guided_call` over the webui's model wrapper; the calls of
    image ``i`` (:meth:`for_image`) carry its row of ``image_cond`` (``c_concat``)."""

    def __init__(self, denoiser, image_cond: Optional[torch.Tensor], image: int = 0):
        self.denoiser = denoiser
        self.image_cond = image_cond
        self.image = image

    def for_image(self, image: int) -> "_InnerModel":
        return _InnerModel(self.denoiser, self.image_cond, image)

    def _image_cond_rows(self, rows: int) -> Optional[torch.Tensor]:
        ic = self.image_cond
        if ic is None:
            return None
        row = ic[self.image:self.image + 1] if ic.shape[0] > self.image else ic[:1]
        return row.expand(rows, *ic.shape[1:])

    def __call__(self, x_in: torch.Tensor, sigma_in: torch.Tensor, context: torch.Tensor,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is not None:   # sgm: {"crossattn", "vector"} (a "concat" key would be concatenated onto x)
            return self.denoiser.inner_model(x_in, sigma_in, cond={"crossattn": context, "vector": y})
        cond = {"c_crossattn": [context], "c_concat": [self._image_cond_rows(x_in.shape[0])]}
        return self.denoiser.inner_model(x_in, sigma_in, cond=cond)


def _cfg_denoised(denoiser):
    """The ``cfg_denoised`` callback over the main rows' outputs ``[c | u_ref | u_sketch]`` (the reference pass
    excluded), before the guidance combination: in-place edits count, as in the webui."""
    from modules import script_callbacks, shared

    def observe(x_out: torch.Tensor) -> None:
        if not script_callbacks.callback_map.get("callbacks_cfg_denoised"):
            return
        params = script_callbacks.CFGDenoisedParams(x_out, shared.state.sampling_step, shared.state.sampling_steps,
                                                    denoiser.inner_model)
        script_callbacks.cfg_denoised_callback(params)

    return observe


def _blend(denoiser, latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The webui's inpainting blend ``latent·nmask + init·mask``, then the scripts' ``on_mask_blend``."""
    blended = latent * denoiser.nmask + denoiser.init_latent * denoiser.mask
    p = denoiser.p
    if getattr(p, "scripts", None) is not None:
        from modules import scripts

        mba = scripts.MaskBlendArgs(latent, denoiser.nmask, denoiser.init_latent, denoiser.mask, blended,
                                    denoiser=denoiser, sigma=sigma)
        p.scripts.on_mask_blend(p, mba)
        blended = mba.blended_latent
    return blended


def colorize_forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
    """Replacement of ``CFGDenoiser.forward`` (bound per instance by :func:`bind`)."""
    from modules import sd_samplers_common, script_callbacks, shared

    state = shared.state
    if state.interrupted or state.skipped:
        raise sd_samplers_common.InterruptedException

    ctx: SamplingContext = self.colorize_context
    if ctx.error is not None:
        raise ctx.error
    if ctx.plan is None or ctx.processors is None:
        raise RuntimeError("ColorizeDiffusion: sampling started without a prepared plan")

    if self.mask_before_denoising and self.mask is not None:
        x = _blend(self, x, sigma)

    plan = ctx.plan
    batch = x.shape[0]
    reference = plan.reference_tokens.to(x.device).expand(batch, -1, -1)
    params = script_callbacks.CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps,
                                                reference, torch.zeros_like(reference), self)
    script_callbacks.cfg_denoiser_callback(params)
    x, image_cond, sigma = params.x, params.image_cond, params.sigma

    batch_together = bool(getattr(shared.opts, "batch_cond_uncond", True))
    by_role: dict = {}
    with torch.no_grad():
        noised_reference = make_noised_reference(self) if plan.injection is not None else None
        denoised = guided_call(plan, ctx.processors, _InnerModel(self, image_cond), x, sigma,
                               timestep_of(self, sigma), noised_reference=noised_reference,
                               batch_together=batch_together, observe=_cfg_denoised(self), outputs_out=by_role)

    if not self.mask_before_denoising and self.mask is not None:
        denoised = _blend(self, denoised, sigma)

    self.sampler.last_latent = self.get_pred_x0(x, denoised, sigma)
    sd_samplers_common.store_latent(preview_latent(self, x, sigma, by_role, self.sampler.last_latent,
                                                   getattr(shared.opts, "live_preview_content", "Prompt")))

    after = script_callbacks.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
    script_callbacks.cfg_after_cfg_callback(after)
    denoised = after.x

    self.step += 1
    return denoised


#: The rows the webui's "Negative prompt" preview shows: the unconditional rows of the mode (the reference-dropped
#: ones first, as in the webui's uncond block), or the cond rows when the mode has none.
NEGATIVE_PREVIEW_ROLES = (REF_DROPPED, SKETCH_DROPPED, COND)


def preview_latent(denoiser, x: torch.Tensor, sigma: torch.Tensor, outputs_by_role: dict,
                   combined: torch.Tensor, content: str) -> torch.Tensor:
    """The live preview's latent by the webui's ``live_preview_content``: "Prompt" the x0 of the full-condition
    rows ``c``, "Negative prompt" that of the unconditional rows, "Combined" (anything else) the guided x0."""
    if content == "Prompt":
        return denoiser.get_pred_x0(x, outputs_by_role[COND], sigma)
    if content == "Negative prompt":
        role = next(r for r in NEGATIVE_PREVIEW_ROLES if r in outputs_by_role)
        return denoiser.get_pred_x0(x, outputs_by_role[role], sigma)
    return combined


def bind(denoiser, context: SamplingContext) -> None:
    """Give this sampler's ``CFGDenoiser`` instance our forward (instance attribute; the class is untouched)."""
    denoiser.colorize_context = context
    denoiser.forward = types.MethodType(colorize_forward, denoiser)


def is_bound(denoiser) -> bool:
    forward = denoiser.__dict__.get("forward")
    return getattr(forward, "__func__", None) is colorize_forward


def unbind(denoiser) -> None:
    if is_bound(denoiser):
        del denoiser.__dict__["forward"]
    denoiser.__dict__.pop("colorize_context", None)


def sampler_denoiser(p) -> Any:
    """``p.sampler.model_wrap_cfg`` or a clear error."""
    sampler = getattr(p, "sampler", None)
    denoiser = getattr(sampler, "model_wrap_cfg", None)
    if denoiser is None:
        raise RuntimeError(f"ColorizeDiffusion: sampler {getattr(p, 'sampler_name', '?')!r} has no CFG denoiser "
                           "(model_wrap_cfg); it cannot be used with ColorizeDiffusion")
    return denoiser
