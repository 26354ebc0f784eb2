"""Stand-in of Forge's ``backend/sampling/sampling_function.py`` for full-image conditions (no areas or masks).

The contract the adapter relies on:

* ``sampling_function`` compiles the prompt conds, runs every ``model_options["conditioning_modifiers"]`` entry as
  ``modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed)`` -> the same 8-tuple, then
  ``sampling_function_inner``;
* ``sampling_function_inner`` drops UNCOND at ``cond_scale == 1`` unless ``disable_cfg1_optimization``, runs
  ``calc_cond_uncond_batch`` and ``x - sampler_cfg_function(args)`` with Forge's ``args`` keys;
* ``calc_cond_uncond_batch`` batches the chunks that concatenate, newest first (UNCOND before COND), as many as
  ``model.memory_required`` fits ``memory_management.get_free_memory`` (else one call per chunk), and calls
  ``model_options["model_function_wrapper"](model.apply_model, {"input", "timestep", "c", "cond_or_uncond"})``
  with ``c["transformer_options"]`` carrying ``cond_or_uncond``, ``sigmas``, ``cond_mark`` and the indices.
"""
import math

import torch

from backend import memory_management
from backend.sampling.condition import compile_conditions, compile_weighted_conditions

COND, UNCOND = 0, 1


def _prepared(conds, x_in):
    return {name: c.process_cond(batch_size=x_in.shape[0], device=x_in.device)
            for name, c in conds["model_conds"].items()}


def _concatenates(a, b):
    return a.keys() == b.keys() and all(a[k].can_concat(b[k]) for k in a)


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    to_run = [(_prepared(c, x_in), COND) for c in cond]
    to_run += [(_prepared(u, x_in), UNCOND) for u in (uncond or [])]
    sums = {COND: torch.zeros_like(x_in), UNCOND: torch.zeros_like(x_in)}
    counts = {COND: torch.full_like(x_in, 1e-37), UNCOND: torch.full_like(x_in, 1e-37)}
    while to_run:
        first = to_run[0][0]
        candidates = [i for i, (c, _) in enumerate(to_run) if _concatenates(c, first)][::-1]
        chosen = candidates[:1]
        free = memory_management.get_free_memory(x_in.device)
        for i in range(1, len(candidates) + 1):
            amount = candidates[:len(candidates) // i]
            if model.memory_required([len(amount) * x_in.shape[0]] + list(x_in.shape[1:])) < free:
                chosen = amount
                break
        picked = [to_run.pop(i) for i in chosen]
        chunks = [kind for _, kind in picked]
        c = {name: picked[0][0][name].concat([p[0][name] for p in picked[1:]]) for name in picked[0][0]}
        options = dict(model_options.get("transformer_options", {}))
        rows = int(timestep.shape[0])
        options["cond_or_uncond"] = chunks[:]
        options["sigmas"] = timestep
        options["cond_mark"] = torch.tensor([k for k in chunks for _ in range(rows)]).to(timestep)
        options["cond_indices"] = [i * rows + r for i, k in enumerate(chunks) if k == COND for r in range(rows)]
        options["uncond_indices"] = [i * rows + r for i, k in enumerate(chunks) if k != COND for r in range(rows)]
        c["transformer_options"] = options
        input_x = torch.cat([x_in] * len(chunks))
        timestep_ = torch.cat([timestep] * len(chunks))
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            output = wrapper(model.apply_model, {"input": input_x, "timestep": timestep_, "c": c,
                                                 "cond_or_uncond": chunks})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for kind, out in zip(chunks, output.chunk(len(chunks))):
            sums[kind] += out
            counts[kind] += 1.0
    return sums[COND] / counts[COND], sums[UNCOND] / counts[UNCOND]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,
                            return_full=False):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                     "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x})
    return (result, cond_pred, uncond_pred) if return_full else result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x, timestep = denoiser_params.x, denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]
    control = unet_patcher.controlnet_linked_list
    if control is not None:
        for h in cond + (uncond or []):
            h["control"] = control
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed,
                                   return_full=True)
