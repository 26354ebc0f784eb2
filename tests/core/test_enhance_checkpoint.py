"""The v1.5 / v2 extra modules: the random builders' released layout (method-enhance §2, numbers restated from the
spec), and loading them from a file's own shapes, with refusals that name the key."""
from __future__ import annotations

import math

import pytest
import torch

from lib_colorize.checkpoint import ENHANCE_PARTS, load_enhance_modules, read_tensors
from lib_colorize.errors import CheckpointError
from lib_colorize.testing.checkpoints import make_checkpoint, released_layout

# method-enhance §2.1-§2.2: (keys, parameters) of each group at full size
V15 = {"lora": (192, 34_352_128), "transformer.": (79, 75_821_056), "thresh_embedder.": (4, 1_312_768)}
V2 = {"lora": (108, 362_496), "model.diffusion_model.warp_modules.": (156, 118_060_800),
      "model.diffusion_model.style_modules.": (72, 72_583_680), "bg_encoder.": (280, 266_104_960),
      "style_encoder.": (280, 276_970_880)}
STYLE_ZERO_LAYERS = [(640, 320), (640, 320), (640, 320), (1280, 320), (1280, 640), (1280, 640), (2560, 640),
                     (2560, 1280), (2560, 1280), (2560, 1280), (2560, 1280), (2560, 1280)]
BG_ZERO_LAYERS = [320] * 4 + [640] * 3 + [1280] * 5


def _extras(version):
    base = released_layout("v1", "full")
    return {k: shape for k, (shape, _) in released_layout(version, "full").items() if k not in base}


def _group(extras, prefix):
    keys = [k for k in extras if (".lora_" in k if prefix == "lora" else k.startswith(prefix))]
    return len(keys), sum(math.prod(extras[k]) for k in keys)


@pytest.mark.parametrize("version,groups,total", [("v1.5", V15, (275, 111_485_952)),
                                                  ("v2", V2, (896, 734_082_816))])
def test_full_size_extras_have_the_released_keys_and_parameter_counts(version, groups, total):
    extras = _extras(version)
    assert (len(extras), sum(math.prod(s) for s in extras.values())) == total
    for prefix, expected in groups.items():
        assert _group(extras, prefix) == expected, prefix


def test_v2_zero_layers_and_lora_ranks_at_full_size():
    lay = released_layout("v2", "full")
    assert [lay[f"style_encoder.zero_layers.{i}.weight"][0] for i in range(12)] == STYLE_ZERO_LAYERS
    assert [lay[f"bg_encoder.zero_layers.{i}.weight"][0] for i in range(12)] == [(c, c, 1, 1) for c in BG_ZERO_LAYERS]
    # entry 11 - i of the style hints fits style_modules[11 - i] (2·ch of decoder block 11 - i)
    for i in range(12):
        assert lay[f"style_encoder.zero_layers.{i}.weight"][0][0] == \
            lay[f"model.diffusion_model.style_modules.{11 - i}.0.weight"][0][0]
    v15 = released_layout("v1.5", "full")
    q = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2."
    assert v15[q + "to_q.lora_down_bg.weight"][0] == (640, 1280)
    assert v15[q + "to_k.lora_down_bg.weight"][0] == (512, 1024)
    assert lay[q + "to_q.lora_down_bg.weight"][0] == (4, 1280)
    assert not any(".lora_" in k and not k.startswith("model.diffusion_model.output_blocks.") for k in lay)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enhance-ckpt")
    return {v: make_checkpoint(folder / f"{name}.safetensors", version=v, size="tiny")
            for v, name in (("v1", "mult-eps"), ("v1.5", "switch-eps"), ("v2", "v2-full"))}


def test_every_part_loads_from_the_files_own_shapes_with_its_values(files):
    v15 = load_enhance_modules(files["v1.5"], ["lora", "thresh_embedder", "cluster_transformer"])
    v2 = load_enhance_modules(files["v2"], ["lora", "warp_modules", "style_modules", "bg_encoder", "style_encoder"])
    assert len(v15.lora) == 16 and len(v2.lora) == 9
    stored = read_tensors(files["v2"], "style_encoder.zero_layers.3.")
    assert torch.equal(v2.style_encoder.zero_layers[3].weight, stored["weight"])
    name = "input_blocks.1.1.transformer_blocks.0.attn2"
    stored = read_tensors(files["v1.5"], f"model.diffusion_model.{name}.to_k.")
    assert torch.equal(v15.lora[name].projections["to_k"].sides["bg"].down.weight, stored["lora_down_bg.weight"])
    assert torch.equal(v15.cluster_transformer.embedding, read_tensors(files["v1.5"], "transformer.")["embedding"])


def test_missing_part_key_and_wrong_shape_are_refused_naming_the_key(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"has no attn2 split LoRA.*BG enhance"):
        load_enhance_modules(files["v1"], ["lora"], needed_by="BG enhance")
    with pytest.raises(CheckpointError, match=r"has no v2 style encoder"):
        load_enhance_modules(files["v1.5"], ["style_encoder"])
    # the layout the issue found wrong: 2·C after the downsample block 3
    wrong = make_checkpoint(tmp_path / "v2-wrong.safetensors", version="v2", size="tiny",
                            overrides={"style_encoder.zero_layers.3.weight": torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=r"style_encoder\.zero_layers\.3\.weight has shape \(64, 32\), "
                                              r"expected \(128, 32\)"):
        load_enhance_modules(wrong, ["style_encoder"])
    dropped = make_checkpoint(tmp_path / "v2-drop.safetensors", version="v2", size="tiny",
                              drop=["model.diffusion_model.warp_modules.7.ff.2.bias"])
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.warp_modules\.7\.ff\.2\.bias"):
        load_enhance_modules(dropped, ["warp_modules"])
    key = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.lora_up_fg.weight"
    no_up = make_checkpoint(tmp_path / "v2-lora.safetensors", version="v2", size="tiny", drop=[key])
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_enhance_modules(no_up, ["lora"])
    bad_rank = make_checkpoint(tmp_path / "v2-rank.safetensors", version="v2", size="tiny",
                               overrides={key: torch.zeros(64, 3)})
    with pytest.raises(CheckpointError, match=r"lora_up_fg\.weight has shape \(64, 3\)"):
        load_enhance_modules(bad_rank, ["lora"])
    assert set(ENHANCE_PARTS) == {"lora", "thresh_embedder", "cluster_transformer", "warp_modules", "style_modules",
                                  "bg_encoder", "style_encoder"}
