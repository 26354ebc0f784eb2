"""Stand-in of Forge's ``backend/modules/k_prediction.py``: the discrete SD schedule as k-diffusion sigmas.

``Prediction(prediction_type=...)`` with Forge's defaults (scaled-linear betas 0.00085 .. 0.012, 1000 steps);
``timestep(sigma)`` is the index of the nearest log-sigma (Forge rounds to the grid), ``sigma(t)`` interpolates.
"""
import torch


class Prediction(torch.nn.Module):
    def __init__(self, sigma_data=1.0, prediction_type="eps", beta_schedule="linear", linear_start=0.00085,
                 linear_end=0.012, timesteps=1000):
        super().__init__()
        assert prediction_type in ("epsilon", "const", "v_prediction", "edm")
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.set_sigmas(sigmas)

    def set_sigmas(self, sigmas):
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def sigma_min(self):
        return self.sigmas[0]

    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            return (model_input * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
                    - model_output * sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma


def k_prediction_from_diffusers_scheduler(scheduler):
    return Prediction(prediction_type=getattr(scheduler, "prediction_type", "epsilon"))
