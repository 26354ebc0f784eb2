"""Stand-in ``modules.sd_hijack``: what the webui does to ldm when a model loads.

``model_hijack.hijack(m)`` applies the cross-attention optimisation (a class-level replacement of
``ldm.modules.attention.CrossAttention.forward``, see ``sd_hijack_optimizations``) and gives ldm's ``openaimodel``
the resizing ``th`` (``sd_hijack_unet``); ``undo_optimizations`` puts ldm's own forward back.
"""
import ldm.modules.attention
import ldm.modules.diffusionmodules.openaimodel
from modules import errors, sd_hijack_optimizations, sd_hijack_unet, shared

attention_CrossAttention_forward = ldm.modules.attention.CrossAttention.forward

optimizers = []
current_optimizer = None


def list_optimizers():
    optimizers.clear()
    sd_hijack_optimizations.list_optimizers(optimizers)
    optimizers.sort(key=lambda x: x.priority, reverse=True)


def apply_optimizations(option=None):
    """Apply the optimisation named ``option`` (default: the ``cross_attention_optimization`` setting);
    "Automatic" takes the available one with the highest priority, "None" leaves ldm's forward. Returns its
    name, or "" for none."""
    global current_optimizer
    undo_optimizations()
    if not optimizers:
        list_optimizers()
    selection = option or shared.opts.cross_attention_optimization
    available = [x for x in optimizers if x.is_available()]
    if selection == "Automatic" and available:
        matching = available[0]
    else:
        matching = next((x for x in available if x.title() == selection or x.name == selection), None)
        if selection not in ("None", "Automatic") and matching is None:
            errors.report(f"Cross attention optimization {selection!r} is not available")
    current_optimizer = matching
    if matching is None:
        return ""
    matching.apply()
    return matching.name


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = attention_CrossAttention_forward


class StableDiffusionModelHijack:
    optimization_method = None

    def hijack(self, m):
        ldm.modules.diffusionmodules.openaimodel.th = sd_hijack_unet.th
        self.optimization_method = apply_optimizations()

    def undo_hijack(self, m):
        undo_optimizations()


model_hijack = StableDiffusionModelHijack()
