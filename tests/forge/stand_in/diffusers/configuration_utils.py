"""Stub of diffusers' ``ConfigMixin`` / ``register_to_config`` as Forge's models use them: ``from_config(dict)``
builds the model from the keys its ``__init__`` takes; ``load_config(folder)`` reads ``config.json``."""
import functools
import inspect
import json
import os


def register_to_config(init):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        names = list(inspect.signature(init).parameters)[1:]
        config = dict(zip(names, args))
        config.update(kwargs)
        self._internal_dict = config
        init(self, *args, **kwargs)

    return wrapped


class ConfigMixin:
    config_name = "config.json"

    @property
    def config(self):
        import types
        return types.SimpleNamespace(**self._internal_dict)

    @classmethod
    def load_config(cls, path, **kwargs):
        with open(os.path.join(path, cls.config_name)) as f:
            return json.load(f)

    @classmethod
    def from_config(cls, config, **kwargs):
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in dict(config).items() if k in names})
