"""Stand-in of Forge's ``backend/patcher/unet.py``: ``UnetPatcher`` (``from_model`` wraps a U-Net in a ``KModel``;
``clone`` keeps the ControlNet list and the extra sampling models; conditioning modifiers and replace-all)."""
import copy

from backend.modules.k_model import KModel
from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, k_predictor=None):
        model = KModel(model=model, diffusers_scheduler=diffusers_scheduler, k_predictor=k_predictor, config=config)
        return UnetPatcher(model, load_device=model.diffusion_model.load_device,
                           offload_device=model.diffusion_model.offload_device,
                           current_device=model.diffusion_model.initial_device)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_patched_controlnet(self, cnet):
        self.controlnet_linked_list = cnet

    def append_model_option(self, k, v, ensure_uniqueness=False):
        values = self.model_options.setdefault(k, [])
        if not (ensure_uniqueness and v in values):
            values.append(v)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def set_model_replace_all(self, patch, target="attn1"):
        for block_name in ("input", "middle", "output"):
            for number in range(16):
                for transformer_index in range(16):
                    self.set_model_patch_replace(patch, target, block_name, number, transformer_index)
