"""Stand-in ``modules.script_callbacks`` (v1.10.1 names and parameter classes; exceptions are reported, not raised)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from modules import errors


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Callable
    name: str | None = None


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


CATEGORIES = ("app_started", "model_loaded", "ui_settings", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg",
              "infotext_pasted", "script_unloaded", "before_ui", "after_component")
callback_map: dict[str, list] = {f"callbacks_{c}": [] for c in CATEGORIES}


def _add(category, fn, name=None):
    callback_map[f"callbacks_{category}"].append(ScriptCallback("stand-in", fn, name))


def _run(category, *args):
    for c in list(callback_map[f"callbacks_{category}"]):
        try:
            c.callback(*args)
        except Exception:  # noqa: BLE001 - the webui reports and continues
            errors.report(f"Error executing callback {category} for {c.script}", exc_info=True)


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        for c in [c for c in callbacks if c.callback == callback_func]:
            callbacks.remove(c)


def on_app_started(callback, *, name=None): _add("app_started", callback, name)
def on_model_loaded(callback, *, name=None): _add("model_loaded", callback, name)
def on_ui_settings(callback, *, name=None): _add("ui_settings", callback, name)
def on_cfg_denoiser(callback, *, name=None): _add("cfg_denoiser", callback, name)
def on_cfg_denoised(callback, *, name=None): _add("cfg_denoised", callback, name)
def on_cfg_after_cfg(callback, *, name=None): _add("cfg_after_cfg", callback, name)
def on_infotext_pasted(callback, *, name=None): _add("infotext_pasted", callback, name)
def on_script_unloaded(callback, *, name=None): _add("script_unloaded", callback, name)
def on_before_ui(callback, *, name=None): _add("before_ui", callback, name)
def on_after_component(callback, *, name=None): _add("after_component", callback, name)


def app_started_callback(demo, app): _run("app_started", demo, app)
def model_loaded_callback(sd_model): _run("model_loaded", sd_model)
def ui_settings_callback(): _run("ui_settings")
def cfg_denoiser_callback(params: CFGDenoiserParams): _run("cfg_denoiser", params)
def cfg_denoised_callback(params: CFGDenoisedParams): _run("cfg_denoised", params)
def cfg_after_cfg_callback(params: AfterCFGCallbackParams): _run("cfg_after_cfg", params)
def script_unloaded_callback(): _run("script_unloaded")
def after_component_callback(component, **kwargs):
    for c in list(callback_map["callbacks_after_component"]):
        try:
            c.callback(component, **kwargs)
        except Exception:  # noqa: BLE001
            errors.report(f"Error executing callback after_component for {c.script}", exc_info=True)
def infotext_pasted_callback(infotext: str, params: dict[str, Any]): _run("infotext_pasted", infotext, params)
