"""Stand-in ``ldm.util``: the helpers the U-Net modules and the webui's model loading use."""
import importlib
from inspect import isfunction


def exists(x):
    return x is not None


def default(val, d):
    """``val`` unless it is None, else ``d`` (called when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


def get_obj_from_str(string):
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config):
    """``target(**params)`` of a config node ``{"target": "pkg.mod.Class", "params": {...}}``."""
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))
