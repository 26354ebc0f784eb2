"""Stand-in ``modules.shared``: options, command-line options, job state and the loaded model."""
import os
import types

from modules import devices


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.infotext = infotext


DEFAULTS = {
    "batch_cond_uncond": True,
    "live_preview_content": "Prompt",
    "live_previews_enable": False,
    "show_progress_every_n_steps": 10,
    "samples_format": "png",
    "enable_quantization": False,
    "skip_early_cond": 0.0,
    "s_min_uncond_all": False,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "sd_checkpoint_cache": 0,
    # samplers (modules/shared_options.py defaults)
    "cross_attention_optimization": "Automatic",
    "randn_source": "GPU",
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "eta_noise_seed_delta": 0,
    "always_discard_next_to_last_sigma": False,
    "no_dpmpp_sde_batch_determinism": False,
    "img2img_fix_steps": False,
}


class Options:
    """Attribute access over ``data``, with registered defaults (like the webui's ``Options``)."""

    def __init__(self):
        object.__setattr__(self, "data", dict(DEFAULTS))
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, name):
        data = object.__getattribute__(self, "data")
        if name in data:
            return data[name]
        labels = object.__getattribute__(self, "data_labels")
        if name in labels:
            return labels[name].default
        raise AttributeError(name)

    def __setattr__(self, name, value):
        self.data[name] = value

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    def reset(self):
        self.data.clear()
        self.data.update(DEFAULTS)
        self.data_labels.clear()


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.job_count = 0
        self.textinfo = None

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, no_half=True, use_cpu=["all"],
                                 disable_safe_unpickle=False, colorize_dir=None, do_not_download_clip=True)
sd_model = None
device = devices.device
hf_endpoint = os.getenv("HF_ENDPOINT", "https://huggingface.co")
parallel_processing_allowed = True
