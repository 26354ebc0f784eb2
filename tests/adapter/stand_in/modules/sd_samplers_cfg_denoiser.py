"""Stand-in ``modules.sd_samplers_cfg_denoiser.CFGDenoiser`` with the webui's ``forward`` contract.

Reproduced from the integration notes (webui-integration §2.2): interrupt check first; mask blending before
(``mask_before_denoising``) or after denoising, each through the scripts' ``on_mask_blend``; rows ``[cond | uncond]``;
``cfg_denoiser`` (values read back), one ``inner_model(x_in, sigma_in, cond={"c_crossattn": [...], "c_concat":
[...]})`` call or ``batch_size`` chunks when ``opts.batch_cond_uncond`` is off; ``cfg_denoised``; the combination
``uncond + scale (cond - uncond)``; ``sampler.last_latent`` and ``store_latent``; ``cfg_after_cfg``;
``step += 1``. Conds are plain tensors (no prompt schedules, no AND).
"""
import torch

from modules import sd_samplers_common, shared
from modules.script_callbacks import (AfterCFGCallbackParams, CFGDenoisedParams, CFGDenoiserParams,
                                      cfg_after_cfg_callback, cfg_denoised_callback, cfg_denoiser_callback)


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False
        self.inner_calls = 0

    @property
    def inner_model(self):
        raise NotImplementedError()

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def _blend(self, latent, sigma):
        from modules import scripts

        blended = latent * self.nmask + self.init_latent * self.mask
        if self.p is not None and getattr(self.p, "scripts", None) is not None:
            mba = scripts.MaskBlendArgs(latent, self.nmask, self.init_latent, self.mask, blended, denoiser=self,
                                        sigma=sigma)
            self.p.scripts.on_mask_blend(self.p, mba)
            blended = mba.blended_latent
        return blended

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        """``uncond + scale (cond - uncond)`` (one cond per image: no AND prompts)."""
        batch = uncond.shape[0]
        return x_out[-batch:] + (x_out[:batch] - x_out[-batch:]) * cond_scale

    def _inner(self, x, sigma, c_crossattn, c_concat):
        self.inner_calls += 1
        if isinstance(c_crossattn, dict):   # SDXL conds: the webui's make_condition_dict keeps the dict
            return self.inner_model(x, sigma, cond=dict(c_crossattn, c_concat=[c_concat]))
        return self.inner_model(x, sigma, cond={"c_crossattn": [c_crossattn], "c_concat": [c_concat]})

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = shared.state
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if self.mask_before_denoising and self.mask is not None:
            x = self._blend(x, sigma)
        batch = x.shape[0]
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, cond,
                                   uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        cond, uncond = params.text_cond, params.text_uncond
        cond_in = _catenate(cond, uncond)
        if shared.opts.batch_cond_uncond:
            x_out = self._inner(x_in, sigma_in, cond_in, image_cond_in)
        else:
            x_out = torch.zeros_like(x_in)
            for a in range(0, x_out.shape[0], batch):
                b = a + batch
                x_out[a:b] = self._inner(x_in[a:b], sigma_in[a:b], _rows(cond_in, a, b), image_cond_in[a:b])
        cfg_denoised_callback(CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-batch:])
        denoised = self.combine_denoised(x_out, None, x_out[batch:], cond_scale * self.cond_scale_miltiplier)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._blend(denoised, sigma)
        self.sampler.last_latent = self.get_pred_x0(x_in[:batch], x_out[:batch], sigma)
        sd_samplers_common.store_latent(self.sampler.last_latent)
        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        self.step += 1
        return after.x


def _catenate(cond, uncond):
    """``catenate_conds``: tensors along the batch, SDXL dict conds key by key."""
    if isinstance(cond, dict):
        return {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    return torch.cat([cond, uncond])


def _rows(cond, a, b):
    """``subscript_cond``."""
    if isinstance(cond, dict):
        return {key: value[a:b] for key, value in cond.items()}
    return cond[a:b]
