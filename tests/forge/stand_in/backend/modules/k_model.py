"""Stand-in of Forge's ``backend/modules/k_model.py``: ``KModel.apply_model(x, sigma, c_concat, c_crossattn,
control, transformer_options, **kwargs)`` scales the input, converts sigma to the U-Net timestep, calls the U-Net in
its computation dtype and returns the denoised latent (float32)."""
import torch

from backend.modules.k_prediction import k_prediction_from_diffusers_scheduler


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_predictor if k_predictor is not None else k_prediction_from_diffusers_scheduler(
            diffusers_scheduler)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        timestep = self.predictor.timestep(t).float()
        output = self.diffusion_model(xc.to(dtype), timestep, context=c_crossattn.to(dtype), control=control,
                                      transformer_options=transformer_options, **kwargs).float()
        return self.predictor.calculate_denoised(sigma, output, x)

    def memory_required(self, input_shape):
        return 1.65 * input_shape[0] * input_shape[2] * input_shape[3] * 4 * 16384
