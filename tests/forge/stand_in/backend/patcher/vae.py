"""Stand-in of Forge's ``backend/patcher/vae.py``: the ``VAE`` wrapper (NHWC [0, 1] pixels, raw latents) with its
``patcher``, ``device`` and ``vae_dtype``; ``decode`` goes through ``model_options["model_vae_decode_wrapper"]``
when one is set."""
from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.first_stage_model = model.eval()
        self.latent_channels = int(model.config.latent_channels)
        self.device = memory_management.vae_device() if device is None else device
        self.vae_dtype = memory_management.vae_dtype() if dtype is None else dtype
        self.first_stage_model.to(self.vae_dtype)
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device,
                                    offload_device=memory_management.vae_offload_device())

    def encode(self, pixel_samples):
        memory_management.load_models_gpu([self.patcher])
        pixels = (2.0 * pixel_samples.movedim(-1, 1) - 1.0).to(device=self.device, dtype=self.vae_dtype)
        return self.first_stage_model.encode(pixels).float()

    def decode(self, samples_in):
        wrapper = self.patcher.model_options.get("model_vae_decode_wrapper")
        return self.decode_inner(samples_in) if wrapper is None else wrapper(self.decode_inner, samples_in)

    def decode_inner(self, samples_in):
        memory_management.load_models_gpu([self.patcher])
        out = self.first_stage_model.decode(samples_in.to(device=self.device, dtype=self.vae_dtype)).float()
        return ((out + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
