"""Stub of Forge's ``backend/memory_management.py`` on a CPU (``--always-cpu``): devices, dtypes and the loaded-model
registry, with Forge's names. Loading moves nothing; the registry records what was loaded, so tests can see it."""
import torch

cpu = torch.device("cpu")
signal_empty_cache = False
VAE_ALWAYS_TILED = False
OOM_EXCEPTION = torch.cuda.OutOfMemoryError
#: Free memory reported to ``calc_cond_uncond_batch`` (tests lower it to make Forge split cond and uncond).
free_memory_bytes = 1 << 40


def get_torch_device():
    return cpu


def unet_offload_device():
    return cpu


def unet_inital_load_device(parameters, dtype):
    return cpu


def unet_dtype(device=None, model_params=0, supported_dtypes=None):
    return torch.float32


def get_computation_dtype(inference_device, parameters=0, supported_dtypes=None):
    return torch.float32


def vae_dtype(device=None, allowed_dtypes=None):
    return torch.float32


def vae_device():
    return cpu


def vae_offload_device():
    return cpu


def intermediate_device():
    return cpu


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def get_free_memory(dev=None, torch_free_too=False):
    return (free_memory_bytes, free_memory_bytes) if torch_free_too else free_memory_bytes


def soft_empty_cache(force=False):
    return None


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device
        self.unloads = 0

    def model_unload(self, avoid_model_moving=False):
        self.unloads += 1

    def __eq__(self, other):
        return self.model is other.model


current_loaded_models = []


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        entry = LoadedModel(model)
        if entry in current_loaded_models:
            current_loaded_models.remove(entry)
        current_loaded_models.insert(0, entry)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_model_clones(model):
    for index in range(len(current_loaded_models) - 1, -1, -1):
        if model.is_clone(current_loaded_models[index].model):
            current_loaded_models.pop(index).model_unload(avoid_model_moving=True)
