"""Stub of Forge's ``backend/patcher/lora.py`` (``patcher/base.py`` makes one ``LoraLoader`` per model)."""


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.loaded_hash = str([])

    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        return None


def merge_lora_to_weight(*args, **kwargs):
    raise NotImplementedError("LoRA is not part of the stand-in")
