"""The stand-in webui against the code it stands in for.

Always: our hooks run under each of the stand-in's cross-attention optimisations, which replace
``CrossAttention.forward`` on the class as the webui's do, and give the same generation under all of them.

With ``CD_WEBUI_DIR`` (a real webui v1.10.1 tree, README: Tests): the stand-in's sampler, scheduler and optimisation
tables equal the webui's; the webui's own DDIM loop, timesteps, schedulers and ``get_sigmas`` (compiled from its
source at test time) give what the stand-in's give; k-diffusion's ``sampling.py`` / ``external.py`` from PyPI are the
webui's pinned files byte for byte; and the real ldm ``UNetModel`` (``repositories/stable-diffusion-stability-ai``,
run in a subprocess) has the stand-in U-Net's module tree and output on the same checkpoint.
"""
from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (load_real_webui_module, real_webui_functions, real_webui_path, real_webui_source_tree,
                      reference_image, sketch_image)

OPTIMISATIONS = ["None", "sdp", "InvokeAI"]


# ----------------------------------------------------------------------------------- attention optimisations
def test_optimisation_replaces_the_class_forward_as_the_webui(webui, sd_model):
    """On a CPU "Automatic" is InvokeAI's split attention, as in the webui; the forward is the class's, with
    ldm's signature, and the modules carry no forward of their own."""
    import ldm.modules.attention as attention
    from modules import sd_hijack, sd_hijack_optimizations

    assert sd_hijack.model_hijack.optimization_method == "InvokeAI"
    assert attention.CrossAttention.forward is sd_hijack_optimizations.split_cross_attention_forward_invokeAI
    blocks = [m for m in sd_model.model.diffusion_model.modules() if isinstance(m, attention.BasicTransformerBlock)]
    assert len(blocks) == 16
    assert all("forward" not in vars(b.attn1) and "forward" not in vars(b.attn2) for b in blocks)
    parameters = list(inspect.signature(attention.CrossAttention.forward).parameters)
    assert parameters == ["self", "x", "context", "mask", "kwargs"]
    sd_hijack.apply_optimizations("None")
    assert attention.CrossAttention.forward is sd_hijack.attention_CrossAttention_forward


def test_kernels_agree_on_plain_attention(webui, sd_model):
    import ldm.modules.attention as attention
    from modules import sd_hijack

    attn = next(m for m in sd_model.model.diffusion_model.modules() if isinstance(m, attention.CrossAttention)
                and m.heads > 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 7, attn.to_k.in_features, generator=g)
    outputs = {}
    for name in OPTIMISATIONS:
        sd_hijack.apply_optimizations(name)
        outputs[name] = (attn(x), attn(x, context=context))
    for name in OPTIMISATIONS[1:]:
        for ours, plain in zip(outputs[name], outputs["None"]):
            assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-5), name


def _generation(webui, options, **kwargs):
    p = webui.txt2img(options, sampler_name="Euler a", steps=2, seed=77, width=64, height=64, batch_size=2,
                      **kwargs)
    webui.run(p)
    return p.all_samples[0]


def test_hooks_give_the_same_generation_under_every_kernel(webui, sd_model):
    """Sketch hints, cross-attention scales (pre-hooks on ``attn2.to_out[0]``, which the sdp kernel calls apart
    from ``to_out[1]``) and attention injection (kwargs hooks on ``attn1``) under each class-level forward."""
    from modules import errors, sd_hijack, shared

    options = {"enabled": True, "sketch": sketch_image(), "reference": reference_image(), "reference_guidance": 3.0,
               "sketch_guidance": 1.5, "reference_strength": 0.6, "injection": True,
               "injection_sketch_fidelity": 0.5}
    results = {}
    for name in OPTIMISATIONS:
        shared.opts.cross_attention_optimization = name
        sd_hijack.apply_optimizations()
        results[name] = _generation(webui, options)
        assert errors.reported == []
    for name in OPTIMISATIONS[1:]:
        assert torch.allclose(results[name], results["None"], atol=1e-4, rtol=1e-4), \
            (name, (results[name] - results["None"]).abs().max())
    weaker = _generation(webui, dict(options, reference_strength=1.0))
    assert not torch.allclose(weaker, results["InvokeAI"], atol=1e-3), "the cross-attention scales had no effect"
    plain = _generation(webui, dict(options, injection=False))
    assert not torch.allclose(plain, results["InvokeAI"], atol=1e-3), "attention injection had no effect"


# ------------------------------------------------------------------------------ the real webui's source
def _assigned(tree: ast.Module, name: str) -> ast.AST:
    return next(node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == name for t in node.targets))


def _literal_entries(node: ast.AST) -> dict:
    """label -> (function name, aliases, options) of a webui sampler list; the function as its source text."""
    entries = {}
    for element in node.elts:
        label, function, aliases, options = element.elts
        entries[ast.literal_eval(label)] = (ast.unparse(function), ast.literal_eval(aliases),
                                            ast.literal_eval(options))
    return entries


def test_sampler_tables_equal_the_webuis():
    from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

    tree = real_webui_source_tree("modules/sd_samplers_kdiffusion.py")
    real = _literal_entries(_assigned(tree, "samplers_k_diffusion"))
    for label, funcname, aliases, options in sd_samplers_kdiffusion.samplers_k_diffusion:
        assert real[label] == (repr(funcname), aliases, options), label
    real_extra = ast.literal_eval(_assigned(tree, "sampler_extra_params"))
    for funcname, params in sd_samplers_kdiffusion.sampler_extra_params.items():
        assert real_extra[funcname] == params, funcname

    real = _literal_entries(_assigned(real_webui_source_tree("modules/sd_samplers_timesteps.py"), "samplers_timesteps"))
    for label, function, aliases, options in sd_samplers_timesteps.samplers_timesteps:
        assert real[label] == (f"sd_samplers_timesteps_impl.{function.__name__}", aliases, options), label


@pytest.fixture
def real_schedulers(webui):
    """The webui's ``modules/sd_schedulers.py`` itself, over the stand-in's ``shared``."""
    return load_real_webui_module("modules/sd_schedulers.py", "webui_real_sd_schedulers")


def test_schedulers_equal_the_webuis(webui, sd_model, real_schedulers):
    from modules import sd_samplers, sd_schedulers

    inner_model = sd_samplers.create_sampler("Euler", sd_model).model_wrap
    sigma_min, sigma_max = inner_model.sigmas[0].item(), inner_model.sigmas[-1].item()
    real = {s.name: s for s in real_schedulers.schedulers}
    for ours in sd_schedulers.schedulers:
        theirs = real[ours.name]
        assert (ours.label, ours.default_rho, ours.need_inner_model, ours.aliases) == \
            (theirs.label, theirs.default_rho, theirs.need_inner_model, theirs.aliases), ours.name
        if ours.function is None:
            assert theirs.function is None
            continue
        for n in (1, 3, 10):
            kwargs = {"n": n, "sigma_min": sigma_min, "sigma_max": sigma_max, "device": "cpu"}
            if ours.need_inner_model:
                kwargs["inner_model"] = inner_model
            assert torch.equal(ours.function(**kwargs), theirs.function(**kwargs)), (ours.name, n)


@pytest.mark.parametrize("scheduler", [None, "Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "DDIM"])
def test_get_sigmas_is_the_webuis(webui, sd_model, real_schedulers, scheduler):
    from modules import devices, sd_samplers, sd_samplers_kdiffusion

    opts = types.SimpleNamespace(always_discard_next_to_last_sigma=False, use_old_karras_scheduler_sigmas=False,
                                 sigma_min=0.0, sigma_max=0.0, rho=0.0)
    real = real_webui_functions("modules/sd_samplers_kdiffusion.py", ["KDiffusionSampler.get_sigmas"],
                           {"torch": torch, "opts": opts, "sd_schedulers": real_schedulers, "devices": devices})
    for label, *_ in sd_samplers_kdiffusion.samplers_k_diffusion:
        sampler = sd_samplers.create_sampler(label, sd_model)
        for hires in (False, True):
            p = webui.txt2img(None, with_script=False, sampler_name=label)
            p.is_hr_pass, p.sampler_noise_scheduler_override = hires, None
            p.scheduler = p.hr_scheduler = scheduler
            for steps in (2, 7):
                theirs = real["KDiffusionSampler.get_sigmas"](sampler, p, steps)
                assert torch.equal(sampler.get_sigmas(p, steps), theirs), (label, hires, steps)


def test_ddim_loop_and_timesteps_are_the_webuis(webui, sd_model):
    """The webui's ``ddim`` / ``ddim_cfgpp`` and ``CompVisSampler.get_timesteps`` on the same denoiser."""
    import k_diffusion.sampling
    import tqdm

    from modules import devices, sd_samplers, sd_samplers_timesteps_impl
    from modules.torch_utils import float64

    opts = types.SimpleNamespace(always_discard_next_to_last_sigma=False)
    real = real_webui_functions("modules/sd_samplers_timesteps_impl.py", ["ddim", "ddim_cfgpp"],
                           {"torch": torch, "np": np, "tqdm": tqdm, "k_diffusion": k_diffusion,
                            "float64": float64})
    real.update(real_webui_functions("modules/sd_samplers_timesteps.py", ["CompVisSampler.get_timesteps"],
                                {"torch": torch, "opts": opts, "devices": devices}))
    sampler = sd_samplers.create_sampler("DDIM", sd_model)
    p = webui.txt2img(None, with_script=False)
    for steps in (1, 3, 7, 30):
        assert torch.equal(sampler.get_timesteps(p, steps), real["CompVisSampler.get_timesteps"](sampler, p, steps))

    class Denoiser:
        """eps and "last uncond eps" of a fixed smooth function, on the model's schedule."""

        def __init__(self):
            self.inner_model = types.SimpleNamespace(inner_model=sd_model)
            self.last_noise_uncond = None

        def __call__(self, x, t, **extra):
            eps = torch.sin(x + t.view(-1, 1, 1, 1) / 300.0)
            self.last_noise_uncond = 0.5 * eps
            return eps

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = sampler.get_timesteps(p, 5)
    for name in ("ddim", "ddim_cfgpp"):
        ours = getattr(sd_samplers_timesteps_impl, name)(Denoiser(), x, timesteps, disable=True)
        theirs = real[name](Denoiser(), x, timesteps, disable=True)
        assert torch.equal(ours, theirs), name


def test_attention_optimisations_have_the_webuis_shape():
    """Same names, signatures, priorities and class-level targets as the webui's optimisations."""
    import ldm.modules.attention as attention
    from modules import sd_hijack_optimizations as ours

    tree = real_webui_source_tree("modules/sd_hijack_optimizations.py")
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in ("scaled_dot_product_attention_forward", "split_cross_attention_forward_invokeAI"):
        real_args = functions[name].args
        assert list(inspect.signature(getattr(ours, name)).parameters) == \
            [a.arg for a in real_args.args] + [real_args.kwarg.arg], name
    for cls in (ours.SdOptimizationSdp, ours.SdOptimizationInvokeAI):
        real = classes[cls.__name__]
        attributes = {t.id: ast.unparse(n.value) for n in real.body if isinstance(n, ast.Assign) for t in n.targets}
        assert ast.literal_eval(attributes["name"]) == cls.name
        assert ast.literal_eval(attributes["cmd_opt"]) == cls.cmd_opt
        if "priority" in attributes:
            assert ast.literal_eval(attributes["priority"]) == cls.priority
        apply = next(f for f in real.body if isinstance(f, ast.FunctionDef) and f.name == "apply")
        targets = {ast.unparse(n.targets[0]): ast.unparse(n.value) for n in apply.body if isinstance(n, ast.Assign)}
        previous = attention.CrossAttention.forward
        try:
            cls().apply()
            stand_in_target = attention.CrossAttention.forward.__name__
        finally:
            attention.CrossAttention.forward = previous
        assert targets["ldm.modules.attention.CrossAttention.forward"] == stand_in_target, cls.__name__
    invokeai_priority = next(f for f in classes["SdOptimizationInvokeAI"].body if isinstance(f, ast.FunctionDef)
                             and f.name == "priority")
    expected = ast.unparse(ast.parse("1000 if shared.device.type != 'mps' and not torch.cuda.is_available() else 10"))
    assert f"return {expected}" in ast.unparse(invokeai_priority)


def test_pypi_k_diffusion_is_the_webuis_pinned_checkout():
    """The webui's ``repositories/k-diffusion`` (ab527a9) and PyPI's 0.1.1.post1: the files the webui imports are
    the same bytes; ``utils.append_dims`` (all those files use of ``utils``) has the same source."""
    installed = Path(str(importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion")))
    for name in ("sampling.py", "external.py"):
        pinned = real_webui_path(f"repositories/k-diffusion/k_diffusion/{name}")
        assert pinned.read_bytes() == (installed / name).read_bytes(), name

    def append_dims(path):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return ast.dump(next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "append_dims"))

    assert append_dims(real_webui_path("repositories/k-diffusion/k_diffusion/utils.py")) == \
        append_dims(installed / "utils.py")


_REAL_LDM = textwrap.dedent("""
    import json, sys, types
    import torch
    from safetensors.torch import load_file
    ldm_root, checkpoint, params, out = sys.argv[1:5]
    sys.path.insert(0, ldm_root)
    listconfig = types.ModuleType("omegaconf.listconfig")
    listconfig.ListConfig = type("ListConfig", (list,), {})
    sys.modules["omegaconf"] = types.ModuleType("omegaconf")
    sys.modules["omegaconf.listconfig"] = listconfig
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(**json.loads(params)).eval()
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.5, 700.0])
    context = torch.randn(2, 9, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features, generator=g)
    with torch.no_grad():
        y = unet(x, t, context=context)
    names = [(n, type(m).__name__) for n, m in unet.named_modules()]
    heads = [m.heads for m in unet.modules() if hasattr(m, "heads")]
    torch.save({"names": names, "heads": heads, "missing": missing, "x": x, "t": t, "context": context, "y": y}, out)
""")


def test_real_ldm_unet_has_the_stand_ins_structure_and_output(webui, sd_model, checkpoint_file, tmp_path):
    from modules import sd_hijack, sd_models
    from safetensors import safe_open

    ldm_root = real_webui_path("repositories/stable-diffusion-stability-ai")
    with safe_open(checkpoint_file, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    params = sd_models.unet_config_for(sd_models._read_config(sd_model.used_config), shapes)["params"]
    out = tmp_path / "real-ldm.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-c", _REAL_LDM, str(ldm_root), checkpoint_file, json.dumps(params), str(out)],
                   check=True, timeout=300, env=env, cwd=tmp_path)
    real = torch.load(out)
    unet = sd_model.model.diffusion_model
    assert real["missing"] == []
    assert real["names"] == [(n, type(m).__name__) for n, m in unet.named_modules()]
    assert real["heads"] == [m.heads for m in unet.modules() if hasattr(m, "heads")]
    for name in OPTIMISATIONS:
        sd_hijack.apply_optimizations(name)
        with torch.no_grad():
            y = unet(real["x"], real["t"], context=real["context"])
        assert torch.allclose(y, real["y"], atol=1e-5, rtol=1e-5), (name, (y - real["y"]).abs().max())
