"""The stand-in of Forge's patch API against Forge's own files (``CD_FORGE_DIR``; skipped without it).

Each stand-in file (``stand_in/backend/...``) is loaded beside the tree's and must agree with it: the signatures the
adapter calls, the batching and wrapper calls of ``calc_cond_uncond_batch``, the CFG function's contract, the
schedule, the conditions' concatenation, and the U-Net's output with replace and block patches.
"""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from .forge_env import CONTEXT_DIM, STAND_IN, requires_forge_tree


def _stand_in(relative: str):
    """The stand-in's version of ``backend/<relative>`` as a separate module (its imports see the tests' backend)."""
    name = "stand_in_" + relative[:-3].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, STAND_IN / "backend" / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forge(relative: str):
    import importlib

    return importlib.import_module("backend." + relative[:-3].replace("/", "."))


def _attr(module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: What the adapter and the tests call, by file.
API = {
    "patcher/unet.py": ("UnetPatcher.from_model", "UnetPatcher.clone", "UnetPatcher.add_conditioning_modifier",
                        "UnetPatcher.set_model_replace_all", "UnetPatcher.add_patched_controlnet"),
    "patcher/base.py": ("ModelPatcher.__init__", "ModelPatcher.set_model_unet_function_wrapper",
                        "ModelPatcher.set_model_sampler_cfg_function", "ModelPatcher.set_model_attn2_replace",
                        "ModelPatcher.set_model_output_block_patch", "ModelPatcher.set_model_patch_replace",
                        "ModelPatcher.set_model_vae_decode_wrapper"),
    "modules/k_model.py": ("KModel.__init__", "KModel.apply_model", "KModel.memory_required"),
    "modules/k_prediction.py": ("Prediction.__init__", "Prediction.timestep", "Prediction.sigma",
                                "Prediction.calculate_input", "Prediction.calculate_denoised"),
    "nn/unet.py": ("IntegratedUNet2DConditionModel.forward", "CrossAttention.forward",
                   "BasicTransformerBlock.forward", "SpatialTransformer.forward"),
    "nn/vae.py": ("IntegratedAutoencoderKL.encode", "IntegratedAutoencoderKL.decode",
                  "IntegratedAutoencoderKL.process_in", "IntegratedAutoencoderKL.process_out"),
    "patcher/vae.py": ("VAE.__init__", "VAE.decode", "VAE.decode_inner"),
    "sampling/condition.py": ("ConditionCrossAttn.can_concat", "ConditionCrossAttn.concat", "Condition.process_cond",
                              "compile_conditions", "compile_weighted_conditions"),
    "sampling/sampling_function.py": ("sampling_function", "sampling_function_inner", "calc_cond_uncond_batch"),
}


@pytest.mark.parametrize("relative", list(API))
def test_signatures_match_forge(relative):
    requires_forge_tree()
    ours, forge = _stand_in(relative), _forge(relative)
    for path in API[relative]:
        expected = list(inspect.signature(_attr(forge, path)).parameters)
        got = list(inspect.signature(_attr(ours, path)).parameters)
        assert got[:len(expected)] == expected or got == expected, (path, got, expected)


class _Model:
    """A cheap model for the batching contract: the output depends on the rows' input and context."""

    def __init__(self, memory: float):
        self.memory = memory
        self.calls = []

    def memory_required(self, shape):
        return self.memory * shape[0]

    def apply_model(self, x, t, c_crossattn=None, transformer_options={}, **kwargs):
        self.calls.append((tuple(transformer_options["cond_or_uncond"]), tuple(x.shape), tuple(c_crossattn.shape)))
        return x * 0.5 + c_crossattn.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def _pairs():
    """(sampling_function, condition) of the stand-in, then of Forge."""
    return [(_stand_in("sampling/sampling_function.py"), _stand_in("sampling/condition.py")),
            (_forge("sampling/sampling_function.py"), _forge("sampling/condition.py"))]


def _conds(module, lengths, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"model_conds": {"c_crossattn": module.ConditionCrossAttn(torch.randn(batch, n, 8, generator=generator))}}
            for n in lengths]


@pytest.mark.parametrize("cond_lengths, uncond_lengths, memory", [
    ((77,), (77,), 1.0), ((77,), (154,), 1.0), ((77,), (1,), 1.0), ((77,), (77,), float("inf")),
    ((77, 77), None, 1.0)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_calc_cond_uncond_batch_matches_forge(cond_lengths, uncond_lengths, memory, wrapped):
    requires_forge_tree()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([2.0, 2.0])
    results = []
    for module, condition in _pairs():
        model = _Model(memory)
        seen = []
        options = {"transformer_options": {}}
        if wrapped:
            def wrapper(apply_model, args, seen=seen):
                seen.append((tuple(args["cond_or_uncond"]), sorted(args["c"]["transformer_options"])))
                return apply_model(args["input"], args["timestep"], **args["c"])
            options["model_function_wrapper"] = wrapper
        uncond = _conds(condition, uncond_lengths, seed=1) if uncond_lengths else None
        out = module.calc_cond_uncond_batch(model, _conds(condition, cond_lengths), uncond, x, sigma, options)
        results.append((out, model.calls, seen))
    (ours, our_calls, our_seen), (forge, forge_calls, forge_seen) = results
    assert our_calls == forge_calls and our_seen == forge_seen
    assert all(torch.allclose(a, b) for a, b in zip(ours, forge))


def test_cfg_function_contract_matches_forge():
    requires_forge_tree()
    x = torch.randn(1, 4, 4, 4)
    sigma = torch.tensor([3.0])
    outputs = []
    for module, condition in _pairs():
        keys = []

        def cfg(args, keys=keys):
            keys.append(sorted(args))
            return args["input"] - (args["uncond_denoised"] + 2.0 * (args["cond_denoised"] - args["uncond_denoised"]))

        for cfg1, disable in ((7.0, False), (1.0, False), (1.0, True)):
            options = {"transformer_options": {}, "sampler_cfg_function": cfg, "disable_cfg1_optimization": disable}
            outputs.append(module.sampling_function_inner(_Model(1.0), x, sigma, _conds(condition, (5,), 1, 2),
                                                          _conds(condition, (5,), 1), cfg1, options))
        outputs.append(keys)
    half = len(outputs) // 2
    assert outputs[half - 1] == outputs[-1]
    assert all(torch.allclose(a, b) for a, b in zip(outputs[:half - 1], outputs[half:-1]))


def test_schedule_matches_forge():
    requires_forge_tree()
    ours, forge = _stand_in("modules/k_prediction.py").Prediction, _forge("modules/k_prediction.py").Prediction
    for kind in ("epsilon", "v_prediction"):
        a, b = ours(prediction_type=kind), forge(prediction_type=kind)
        assert torch.equal(a.sigmas, b.sigmas)
        sigma = torch.exp(torch.linspace(-3, 2.6, 37))
        assert torch.equal(a.timestep(sigma), b.timestep(sigma))
        t = torch.linspace(0, 999, 23)
        assert torch.allclose(a.sigma(t), b.sigma(t))
        x, out = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
        s = torch.tensor([0.5, 4.0])
        assert torch.allclose(a.calculate_denoised(s, out, x), b.calculate_denoised(s, out, x))
        assert torch.allclose(a.calculate_input(s, x), b.calculate_input(s, x))


def test_unet_with_patches_matches_forge(checkpoint_file):
    """Our U-Net config built in the stand-in's and in Forge's class: the same output, also with an attn2 replace
    patch and an output-block patch (the keys Forge looks them up by)."""
    requires_forge_tree()
    from cd_forge.model import forge_unet_config, set_attention_heads
    from lib_colorize.checkpoint import UNET_PREFIX, read_tensors
    from lib_colorize.models.unet import UNetConfig

    tensors = read_tensors(checkpoint_file, UNET_PREFIX)
    config = UNetConfig.from_state_dict(tensors)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10.0, 900.0])
    context = torch.randn(2, 5, CONTEXT_DIM, generator=generator)
    outputs = []
    for module in (_stand_in("nn/unet.py"), _forge("nn/unet.py")):
        unet = module.IntegratedUNet2DConditionModel.from_config(forge_unet_config(config))
        unet.load_state_dict(tensors)
        set_attention_heads(unet, config.head_channels)
        seen = []

        def attn2(q, k, v, extra, seen=seen):
            seen.append((extra["block"], extra["block_index"], extra["n_heads"]))
            heads = extra["n_heads"]
            b, n, inner = q.shape
            q, k, v = (z.view(b, -1, heads, inner // heads).transpose(1, 2) for z in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return 0.5 * out.transpose(1, 2).reshape(b, n, inner)

        def output_block(h, hsp, transformer_options):
            return h, hsp * 0.9

        options = {"patches_replace": {"attn2": {("input", 4, 0): attn2, ("output", 3): attn2}},
                   "patches": {"output_block_patch": [output_block]}}
        with torch.no_grad():
            plain = unet(x, t, context=context, transformer_options={})
            patched = unet(x, t, context=context, transformer_options=options)
        outputs.append((plain, patched, seen))
    (a_plain, a_patched, a_seen), (b_plain, b_patched, b_seen) = outputs
    assert torch.allclose(a_plain, b_plain, atol=2e-5) and torch.allclose(a_patched, b_patched, atol=2e-5)
    assert a_seen == b_seen and len(a_seen) == 2
    assert not torch.allclose(a_plain, a_patched, atol=1e-3)


def test_vae_matches_forge(checkpoint_file, colorize):
    requires_forge_tree()
    from cd_forge.model import vae_config_dir
    from lib_colorize.checkpoint import VAE_PREFIX, read_tensors

    tensors = read_tensors(checkpoint_file, VAE_PREFIX)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    results = []
    for module in (_stand_in("nn/vae.py"), _forge("nn/vae.py")):
        config = dict(module.IntegratedAutoencoderKL.load_config(vae_config_dir()))
        config.update(block_out_channels=[32, 64, 128, 128], layers_per_block=2)
        vae = module.IntegratedAutoencoderKL.from_config(config)
        vae.load_state_dict({k: v.float() for k, v in tensors.items()})
        with torch.no_grad():
            posterior = vae.encode(image, regulation=lambda p: p)
            results.append((posterior.mean, posterior.std, vae.decode(posterior.mean), vae.process_in(posterior.mean)))
    assert all(torch.allclose(a, b, atol=2e-5) for a, b in zip(*results))
