"""XL against the real webui tree (``CD_WEBUI_DIR``): our U-Net is sgm's SDXL U-Net (method-xl §1.5, §10.2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import real_webui_path
from lib_colorize.checkpoint import load_checkpoint
from lib_colorize.testing.xl_checkpoints import make_xl_checkpoint


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return make_xl_checkpoint(tmp_path_factory.mktemp("xl") / "sdxl-tiny.safetensors", "sdxl", seed=1)


_REAL_SGM = textwrap.dedent("""
    import json, sys, types
    import torch
    from safetensors.torch import load_file
    root, checkpoint, params, out = sys.argv[1:5]
    # the package __init__s import the whole training stack; the U-Net modules need none of it
    listconfig = types.ModuleType("omegaconf.listconfig")
    listconfig.ListConfig = type("ListConfig", (list,), {})
    sys.modules["omegaconf"] = types.ModuleType("omegaconf")
    sys.modules["omegaconf"].ListConfig = listconfig.ListConfig
    sys.modules["omegaconf.listconfig"] = listconfig
    for name, rel in (("sgm", "sgm"), ("sgm.modules", "sgm/modules"),
                      ("sgm.modules.diffusionmodules", "sgm/modules/diffusionmodules")):
        module = types.ModuleType(name)
        module.__path__ = [root + "/" + rel]
        sys.modules[name] = module
    from sgm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**json.loads(params)).eval()
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
    unet.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.5, 700.0])
    context, y = torch.randn(2, 196, 64, generator=g), torch.randn(2, 512, generator=g)
    with torch.no_grad():
        result = unet(x, timesteps=t, context=context, y=y)
    names = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    torch.save({"names": names, "x": x, "t": t, "context": context, "y": y, "out": result}, out)
""")


def test_our_unet_is_sgms_with_a_512_wide_label_emb(sdxl_file, tmp_path):
    """The CD-XL U-Net is sgm's SDXL U-Net (method-xl §1.5): sgm's class from the webui tree, built from the
    webui's sd_xl_base.yaml at the file's widths with adm_in_channels 512, loads the file strictly and gives our
    output."""
    import yaml

    root = real_webui_path("repositories/generative-models")
    config = yaml.safe_load((root / "configs/inference/sd_xl_base.yaml").read_text())
    params = dict(config["model"]["params"]["network_config"]["params"])
    params.update(adm_in_channels=512, model_channels=32, context_dim=64, use_checkpoint=False,
                  spatial_transformer_attn_type="softmax")
    out = tmp_path / "sgm.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-c", _REAL_SGM, str(root), sdxl_file, json.dumps(params), str(out)],
                   check=True, timeout=300, env=env, cwd=tmp_path)
    real = torch.load(out)
    unet = load_checkpoint(sdxl_file, components=("unet",)).unet
    names = {id(m): n for n, m in unet.named_modules()}
    assert real["names"] == [names[id(b)] for b in unet.transformer_blocks()]
    with torch.no_grad():
        ours = unet(real["x"], real["t"], real["context"], real["y"])
    torch.testing.assert_close(ours, real["out"], atol=1e-5, rtol=1e-5)
