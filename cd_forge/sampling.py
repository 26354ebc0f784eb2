"""ColorizeDiffusion inside Forge's sampling, through Forge's patch points (forge-integration §5).

Forge's sampler evaluates two row groups per step, COND and UNCOND (``calc_cond_uncond_batch``), and combines
them with a CFG function. The method needs three (method §5.1): ``c`` (reference + sketch), ``u_ref``
(reference dropped) and ``u_sketch`` (sketch dropped). On the clone of our U-Net that a pass samples with,
:func:`install` registers three patches:

* a **conditioning modifier**: COND gets the reference tokens as its cross-attention context and UNCOND the
  reference-dropped context (one zero token for both outside the guidance window, method §5.4). Where Forge passes
  no UNCOND (CFG scale 1, and the hires pass at the API's default ``hr_cfg`` 1) it is created here, so the
  reference-dropped rows exist on every step; the prompt's conditioning is not used;
* a **model function wrapper**: Forge hands it ``apply_model`` and the chunks it batched. On the first call of a
  step it evaluates every row group the mode needs with :func:`lib_colorize.denoiser.evaluate_rows`, image by
  image (the attention-injection reference pass first, when due), and answers each chunk from those outputs: COND
  -> ``c``, UNCOND -> ``u_ref`` (``u_sketch`` in sketch-only mode). A chunk Forge sends in a separate call of the
  same step (it splits them when memory is short) gets its rows without a second evaluation;
* a **CFG function** (registered with ``disable_cfg1_optimization``, so Forge never drops UNCOND): the method's
  dual guidance (:func:`lib_colorize.guidance.combine`) over the step's ``c``, ``u_ref`` and ``u_sketch``.

The behaviours inside the U-Net -- sketch hints, per-layer cross-attention scales (before ``to_out``, so its bias
stays unscaled), attention injection -- are the same :mod:`lib_colorize.processors` torch hooks as in
AUTOMATIC1111, attached to our own U-Net, driven by the per-call plans :func:`evaluate_rows` enters.

**Conflicts.** Patch points hold one owner each. Another extension that holds the U-Net call or the CFG function,
replaces self- or cross-attention (``attn1``/``attn2`` replace patches: reference-only, IP-Adapter) or adds a
ControlNet would be silently overridden or would override us, so the generation stops with a message naming it
(:func:`foreign_conflicts`). Its other patches (FreeU, say) keep working: the ones it put on the host's U-Net
before our hook ran are carried over to ours (:func:`carry_over`), and the ones added after us land on ours.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lib_colorize.denoiser import GenerationPlan, evaluate_rows, k_noised_reference, outputs_by_role, row_contexts
from lib_colorize.errors import ColorizeError
from lib_colorize.guidance import COND, REF_DROPPED, SKETCH_DROPPED, combine, progress
from lib_colorize.processors import ProcessorSet

#: Forge's chunk marks in ``cond_or_uncond``.
CHUNK_COND, CHUNK_UNCOND = 0, 1

#: Patch points that hold one owner: model_options key -> what it does (for the conflict message).
SINGLE_OWNER_OPTIONS = {"model_function_wrapper": "the U-Net call (model function wrapper)",
                        "sampler_cfg_function": "the guidance (sampler CFG function)"}
REPLACED_ATTENTION = {"attn1": "self-attention (attn1 replace patches)",
                      "attn2": "cross-attention (attn2 replace patches)"}


class PatchConflict(ColorizeError):
    """Another extension holds a patch point ColorizeDiffusion needs in this generation."""


def owner_of(obj: Any) -> str:
    """Who registered a patch: the extension folder its code lives in, else its module."""
    target = getattr(obj, "func", obj)                      # functools.partial
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)):
        target = type(target)                               # a callable object
    try:
        path = inspect.getsourcefile(target) or inspect.getfile(target)
    except TypeError:
        path = None
    if path:
        parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
        for index in range(len(parts) - 2, -1, -1):
            if parts[index] in ("extensions", "extensions-builtin"):
                return f"the extension '{parts[index + 1]}'"
    return f"'{getattr(target, '__module__', None) or type(obj).__name__}'"


def _conflict_message(conflicts: list) -> str:
    items = "; ".join(f"{owner} holds {what}" for what, owner in conflicts)
    owners = ", ".join(dict.fromkeys(owner for _, owner in conflicts))
    return (f"ColorizeDiffusion cannot run together with {owners} in one generation: {items}, which "
            f"ColorizeDiffusion needs. Turn {owners} off while ColorizeDiffusion is enabled.")


# -------------------------------------------------------------------------------------- carrying over / conflicts
def _added(value: Any, base: Any) -> Any:
    """What ``value`` (a model_options entry) adds to ``base``: new list items, new dict entries (recursively),
    or the value itself when it differs. ``None`` when nothing was added."""
    if isinstance(value, list):
        base = base if isinstance(base, list) else []
        new = [item for item in value if not any(item is old or item == old for old in base)]
        return new or None
    if isinstance(value, dict):
        base = base if isinstance(base, dict) else {}
        new = {}
        for key, item in value.items():
            added = _added(item, base.get(key)) if key in base else item
            if added is not None:
                new[key] = added
        return new or None
    if _same(value, base):
        return None
    return value


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other objects without a plain ==
        return False


def foreign_additions(found, pristine) -> dict:
    """The model_options other extensions put on ``found`` (the pass's U-Net as our hook finds it) on top of
    ``pristine`` (the host's U-Net after LoRA, what Forge resets each pass to)."""
    return _added(found.model_options, pristine.model_options) or {}


def foreign_conflicts(model_options: dict, ours: dict, controlnet: Any = None) -> list:
    """``[(what, owner)]`` of the patch points in ``model_options`` held by someone else than ``ours``
    (``{key: our function}``), plus any attention replace patch and a ControlNet."""
    conflicts = []
    for key, what in SINGLE_OWNER_OPTIONS.items():
        fn = model_options.get(key)
        if fn is not None and fn is not ours.get(key):
            conflicts.append((what, owner_of(fn)))
    replace = (model_options.get("transformer_options") or {}).get("patches_replace") or {}
    for name, what in REPLACED_ATTENTION.items():
        patches = replace.get(name) or {}
        for owner in dict.fromkeys(owner_of(fn) for fn in patches.values()):
            conflicts.append((what, owner))
    if controlnet is not None:
        conflicts.append(("a ControlNet on the U-Net", owner_of(controlnet)))
    return conflicts


def _merge(target: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, list):
            target[key] = list(target.get(key) or []) + value
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = dict(target[key])
            _merge(target[key], value)
        else:
            target[key] = value


def carry_over(unet, found, pristine) -> None:
    """Put what other extensions added to the host's U-Net for this pass onto ours (``unet``, before our own
    patches); refuse the conflicting ones (:class:`PatchConflict`)."""
    extra = foreign_additions(found, pristine)
    controlnet = found.controlnet_linked_list
    controlnet = controlnet if controlnet is not pristine.controlnet_linked_list else None
    concat = found.extra_concat_condition
    conflicts = foreign_conflicts(extra, {}, controlnet)
    if concat is not None and concat is not pristine.extra_concat_condition:
        conflicts.append(("an extra concat condition (inpainting)", "another extension"))
    if conflicts:
        raise PatchConflict(_conflict_message(conflicts))
    _merge(unet.model_options, extra)
    unet.extra_model_patchers_during_sampling += [
        m for m in found.extra_model_patchers_during_sampling if m not in pristine.extra_model_patchers_during_sampling]
    unet.extra_preserved_memory_during_sampling += max(
        0, found.extra_preserved_memory_during_sampling - pristine.extra_preserved_memory_during_sampling)


# --------------------------------------------------------------------------------------------------- one pass
class _ForgeRows:
    """``inner_model(x_in, sigma_in, context)`` for :func:`evaluate_rows` over Forge's ``apply_model``."""

    def __init__(self, apply_model: Callable, transformer_options: dict):
        self.apply_model = apply_model
        self.transformer_options = transformer_options

    def __call__(self, x_in: torch.Tensor, sigma_in: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        rows = int(x_in.shape[0])
        options = dict(self.transformer_options)
        # one chunk of `rows` rows, as Forge's own patches index them
        options.update(cond_or_uncond=[CHUNK_COND], sigmas=sigma_in, cond_indices=list(range(rows)),
                       uncond_indices=[], cond_mark=torch.zeros(rows, dtype=sigma_in.dtype, device=sigma_in.device))
        return self.apply_model(x_in, sigma_in, c_crossattn=context, transformer_options=options)


@dataclass(eq=False)
class ForgePass:
    """What the patches of one sampling pass share: the plan, the processors on our U-Net, its predictor, and the
    outputs of the step being evaluated."""

    plan: GenerationPlan
    processors: ProcessorSet
    predictor: Any
    ours: dict = field(default_factory=dict)     # patch point -> our function (conflict check)
    checked: bool = False
    stats: dict = field(default_factory=lambda: {"steps": 0, "created_uncond": 0, "wrapper_calls": 0})
    _step: Optional[tuple] = None

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.predictor.timestep(sigma.reshape(-1)[:1])

    def window_open(self, sigma: torch.Tensor) -> bool:
        return self.plan.window.is_open(progress(self.timestep(sigma)))

    @staticmethod
    def _key(x: torch.Tensor, sigma: torch.Tensor) -> tuple:
        return tuple(float(s) for s in sigma.reshape(-1).tolist()), tuple(x.shape)

    def step_outputs(self, apply_model: Callable, x: torch.Tensor, sigma: torch.Tensor,
                     transformer_options: dict) -> dict:
        """The outputs by role of this step (evaluated on the step's first wrapper call)."""
        key = self._key(x, sigma)
        if self._step is not None and self._step[0] == key:
            return self._step[1]
        noised = (k_noised_reference(self.predictor.sigmas, self.predictor.timestep)
                  if self.plan.injection is not None else None)
        roles, outputs = evaluate_rows(self.plan, self.processors, _ForgeRows(apply_model, transformer_options),
                                       x, sigma, self.timestep(sigma), noised_reference=noised)
        by_role = outputs_by_role(self.plan, roles, outputs)
        self._step = (key, by_role)
        return by_role

    def finish_step(self, x: torch.Tensor, sigma: torch.Tensor) -> dict:
        """The step's outputs by role, for the CFG function (which ends the step)."""
        step, self._step = self._step, None
        if step is None or step[0] != self._key(x, sigma):
            raise RuntimeError("ColorizeDiffusion: the CFG function ran without our model function wrapper "
                               "(another extension replaced it)")
        self.stats["steps"] += 1
        return step[1]

    def uncond_role(self) -> str:
        roles = self.plan.roles
        return REF_DROPPED if REF_DROPPED in roles else (SKETCH_DROPPED if SKETCH_DROPPED in roles else COND)


def make_patches(forge_pass: ForgePass, condition_class: type):
    """The conditioning modifier, model function wrapper and CFG function of one pass (plain closures: Forge
    deep-copies model_options on every clone, which keeps functions as they are)."""
    plan = forge_pass.plan

    def conditioning_modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if not forge_pass.checked:
            controlnet = next((c.get("control") for c in list(cond) + list(uncond or []) if c.get("control")), None)
            conflicts = foreign_conflicts(model_options, forge_pass.ours, controlnet)
            if conflicts:
                raise PatchConflict(_conflict_message(conflicts))
            forge_pass.checked = True
        if uncond is None:
            forge_pass.stats["created_uncond"] += 1
        batch = int(x.shape[0])
        window_open = forge_pass.window_open(timestep)
        contexts = {role: row_contexts(plan, (role,), batch, window_open).to(x.device)
                    for role in (COND, REF_DROPPED)}
        cond = [{"model_conds": {"c_crossattn": condition_class(contexts[COND])}}]
        uncond = [{"model_conds": {"c_crossattn": condition_class(contexts[REF_DROPPED])}}]
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def model_function_wrapper(apply_model, args):
        x, timestep, c, chunks = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
        forge_pass.stats["wrapper_calls"] += 1
        batch = int(x.shape[0]) // len(chunks)
        by_role = forge_pass.step_outputs(apply_model, x[:batch], timestep[:batch],
                                          dict(c.get("transformer_options") or {}))
        uncond = forge_pass.uncond_role()
        return torch.cat([by_role[COND] if chunk == CHUNK_COND else by_role[uncond] for chunk in chunks])

    def sampler_cfg_function(args):
        x = args["input"]
        by_role = forge_pass.finish_step(x, args["sigma"])
        return x - combine(by_role, plan.mode, plan.reference_guidance, plan.sketch_guidance)

    return conditioning_modifier, model_function_wrapper, sampler_cfg_function


def install(unet, forge_pass: ForgePass, condition_class: type) -> None:
    """Register the pass's three patches on ``unet`` (a clone of our U-Net)."""
    modifier, wrapper, cfg_function = make_patches(forge_pass, condition_class)
    unet.add_conditioning_modifier(modifier)
    unet.set_model_unet_function_wrapper(wrapper)
    unet.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=True)
    forge_pass.ours.update(model_function_wrapper=unet.model_options["model_function_wrapper"],
                           sampler_cfg_function=unet.model_options["sampler_cfg_function"])
