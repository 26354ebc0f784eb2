"""Stand-in ``modules.sd_models_config``: a ``<checkpoint>.yaml`` beside the file wins; otherwise a guess
(here: always the stand-in's SD default config path, which the tests treat as "the webui's guess")."""
import os

config_default = "stand-in-v1-inference.yaml"


def find_checkpoint_config_near_filename(info):
    if info is None:
        return None
    config = f"{os.path.splitext(info.filename)[0]}.yaml"
    return config if os.path.exists(config) else None


def guess_model_config_from_state_dict(sd, filename):
    return config_default


def find_checkpoint_config(state_dict, info):
    if info is None:
        return guess_model_config_from_state_dict(state_dict, "")
    config = find_checkpoint_config_near_filename(info)
    if config is not None:
        return config
    return guess_model_config_from_state_dict(state_dict, info.filename)
