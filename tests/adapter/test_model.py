"""cd_webui.model against webui realities: checkpoints decided from their key tables (never by unpickling a
``.ckpt``), the missing text encoder's conds under the webui's own emphasis modes, the reference encoder's precision,
and lazy loading that leaves the webui's random state alone."""
from __future__ import annotations

import pytest
import torch

from conftest import load_real_webui_module, real_webui_functions
from lib_colorize import checkpoint as ckpt
from lib_colorize.checkpoint import read_tensors
from lib_colorize.errors import NotColorizeModel

import cd_webui.model as cd_model


def as_ckpt(safetensors_path: str, target) -> str:
    torch.save({"state_dict": read_tensors(safetensors_path, ""), "global_step": 1}, str(target))
    return str(target)


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load fails; key-table reads are counted."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    reads = []
    original = getattr(ckpt, "read_pickle_key_table", None)
    if original is not None:
        monkeypatch.setattr(ckpt, "read_pickle_key_table", lambda path: reads.append(path) or original(path))
    return reads


def test_a_colorize_ckpt_is_recognised_from_its_key_table_once(webui, sd_model, checkpoint_file, tmp_path,
                                                                no_unpickling):
    from modules import sd_models

    path = as_ckpt(checkpoint_file, tmp_path / "mult-eps-tiny.ckpt")
    sd_model.sd_checkpoint_info = sd_models.CheckpointInfo(path)
    sd_model.used_config = str(tmp_path / "mult-eps-tiny.yaml")       # a user's YAML: only the keys can tell
    with torch.no_grad():
        for parameter in sd_model.cond_stage_model.parameters():
            parameter.normal_()
    for _ in range(3):                                                 # model load, then two VAE reloads
        cd_model.on_model_loaded(sd_model)
    assert cd_model.require_colorize_model(sd_model).version == "v1"
    assert len(no_unpickling) == 1
    # the .ckpt has no cond_stage_model.*: the text encoder got its constant weights (known from the key table)
    assert torch.equal(sd_model.cond_stage_model[1].bias, torch.ones(8))


def test_a_plain_sd_ckpt_is_read_once_and_refused_clearly(webui, sd_model, plain_sd_file, tmp_path, no_unpickling):
    from modules import sd_models

    path = as_ckpt(plain_sd_file, tmp_path / "sd21.ckpt")
    sd_model.sd_checkpoint_info = sd_models.CheckpointInfo(path)
    sd_model.used_config = "v2-inference.yaml"
    for _ in range(3):
        cd_model.on_model_loaded(sd_model)
    with pytest.raises(NotColorizeModel, match="plain Stable Diffusion checkpoint"):
        cd_model.require_colorize_model(sd_model)
    assert len(no_unpickling) == 1


def test_the_config_resolver_remembers_the_state_dict_the_webui_loaded(webui, checkpoint_file, tmp_path,
                                                                        no_unpickling):
    from modules import sd_models, sd_models_config

    path = as_ckpt(checkpoint_file, tmp_path / "mult-eps-tiny.ckpt")
    state_dict = read_tensors(checkpoint_file, "")
    config = sd_models_config.find_checkpoint_config(state_dict, sd_models.CheckpointInfo(path))
    assert config == cd_model.CONFIGS["eps"]
    assert cd_model.checkpoint_info(path).version == "v1"
    assert no_unpickling == []                                         # decided from the webui's own state dict


# ------------------------------------------------------------------------------------------ text encoder
class _OpenCLIPTextEmbedder(torch.nn.Module):
    """The module tree of ldm's ``FrozenOpenCLIPEmbedder`` (``self.model`` = an open_clip CLIP without its
    visual tower), built from the tiny registered architecture."""

    def __init__(self, layer_idx: int):
        super().__init__()
        from lib_colorize.testing.clip import make_tiny_clip_model

        model = make_tiny_clip_model(seed=5)
        del model.visual
        self.model = model
        self.layer_idx = layer_idx


@pytest.mark.parametrize("layer_idx", [0, 1])        # "last" (SD 2 inference yaml: penultimate = 1)
def test_missing_text_encoder_gives_finite_conds_in_every_emphasis_mode(webui, sd_model, layer_idx):
    from torch.utils.checkpoint import checkpoint

    encoder = _OpenCLIPTextEmbedder(layer_idx)
    encode = real_webui_functions(
        "repositories/stable-diffusion-stability-ai/ldm/modules/encoders/modules.py",
        ["FrozenOpenCLIPEmbedder.encode_with_transformer", "FrozenOpenCLIPEmbedder.text_transformer_forward"],
        {"torch": torch, "checkpoint": checkpoint})
    encoder.encode_with_transformer = encode["FrozenOpenCLIPEmbedder.encode_with_transformer"].__get__(encoder)
    encoder.text_transformer_forward = encode["FrozenOpenCLIPEmbedder.text_transformer_forward"].__get__(encoder)
    sd_model.cond_stage_model = encoder
    assert cd_model.clear_text_encoder(sd_model)
    emphasis = load_real_webui_module("modules/sd_emphasis.py", "webui_real_sd_emphasis")

    context = encoder.model.positional_embedding.shape[0]
    tokens = torch.randint(0, encoder.model.token_embedding.num_embeddings, (2, context),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = encoder.encode_with_transformer(tokens)
    multipliers = torch.ones(2, context)
    multipliers[:, 3:6] = 1.1                                           # "(emphasised:1.1)" words
    multipliers[1, 7] = 0.9
    for option in emphasis.options:
        mode = option()
        mode.tokens, mode.multipliers, mode.z = tokens.tolist(), multipliers, z.clone()
        mode.after_transformers()
        assert torch.isfinite(mode.z).all(), f"emphasis {option.name} gives non-finite conds"
        assert float(mode.z.abs().mean()) > 0


# ------------------------------------------------------------------------------- reference encoder precision
def test_the_reference_encoder_runs_in_float32_unless_the_setting_says_otherwise(webui, monkeypatch):
    """The original keeps OpenCLIP in fp32; with the webui in half precision (on a GPU) the towers stay fp32 by
    default, and follow the webui's precision only when the setting asks for it."""
    from modules import shared

    monkeypatch.setattr(cd_model, "compute_dtype", lambda: torch.float16)     # the webui's half precision
    assert shared.opts.data[cd_model.SETTING_CLIP_PRECISION] == "float32"
    assert next(cd_model.reference_encoder().parameters()).dtype == torch.float32
    assert next(cd_model.text_encoder().parameters()).dtype == torch.float32
    shared.opts.data[cd_model.SETTING_CLIP_PRECISION] = "webui"
    assert next(cd_model.reference_encoder().parameters()).dtype == torch.float16
    assert next(cd_model.text_encoder().parameters()).dtype == torch.float16
    shared.opts.data[cd_model.SETTING_CLIP_PRECISION] = "float32"
    assert next(cd_model.reference_encoder().parameters()).dtype == torch.float32
