"""The enhance modes in the webui (method-enhance §5-§8): the checkpoint's extra modules, the mask extractors and
the per-pass preparation, over :mod:`lib_colorize.enhance`.

* **extra modules** -- read from the loaded checkpoint file by key prefix (only the parts a mode needs, on
  first use), in the U-Net's dtype on the compute device, cached by ``(path, mtime, size)`` and dropped when
  another checkpoint is used (the webui itself drops these keys: its ldm U-Net has no place for them);
* **mask extractors** -- IS-Net files in the extension's models folder (``models/ColorizeDiffusion``, downloaded
  there when allowed), run on the compute device and moved back to the CPU after use;
* **preparation** -- once per sampling pass (hires fix: again at the second pass's size), everything cached by
  content, so a repeated generation encodes nothing again.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from lib_colorize.cache import ContentCache

from . import model

_lock = threading.RLock()
_modules: dict = {}          # checkpoint file key -> EnhanceModules
_cache = ContentCache(max_entries=32)
_extractors: dict = {}       # (models dir, device) -> MaskExtractors


def loaded_version(sd_model=None) -> Optional[str]:
    """Version of the loaded ColorizeDiffusion checkpoint, or None (none loaded / another model)."""
    try:
        return model.require_colorize_model(sd_model).version
    except Exception:  # noqa: BLE001 - the UI only asks what to show
        return None


def enhance_modules(sd_model, parts, device, dtype):
    """The checkpoint's extra modules ``parts`` (:data:`lib_colorize.checkpoint.ENHANCE_PARTS`)."""
    from lib_colorize.checkpoint import load_enhance_modules
    from lib_colorize.models.enhance import EnhanceModules

    info = model.require_colorize_model(sd_model)
    path = model.checkpoint_path(sd_model)
    key = model.file_key(path)
    with _lock:
        have = _modules.get(key)
        if have is None:
            _modules.clear()
            have = _modules[key] = EnhanceModules(version=info.version, path=path)
        missing = [p for p in parts if (not have.lora if p == "lora" else getattr(have, p) is None)]
        if missing:
            print(f"ColorizeDiffusion: loading {', '.join(missing)} from {path}")
            loaded = load_enhance_modules(path, missing, dtype=dtype, device=device,
                                          needed_by="the chosen enhance mode").to(dtype=dtype)
            for part in missing:
                setattr(have, part, getattr(loaded, part))
    return have


def mask_extractors():
    from lib_colorize.masks import MaskExtractors

    folder, device = model.models_dir(), model.compute_device()
    key = (folder, str(device))
    with _lock:
        found = _extractors.get(key)
        if found is None:
            _extractors.clear()
            # downloads follow HF_HUB_OFFLINE (lib_colorize.weights); their progress shows in the webui
            found = _extractors[key] = MaskExtractors(folder, device, cache=_cache, offload=device.type != "cpu",
                                                      progress=model.download_progress)
    return found


def prepare(p, options, sketch: torch.Tensor, box, tokens: torch.Tensor, seeds, size, device, dtype):
    """``(EnhancePlan, context)`` of one sampling pass (:func:`lib_colorize.enhance.prepare_enhance`)."""
    from lib_colorize import enhance
    from modules import devices

    sd_model = getattr(p, "sd_model", None)
    if sd_model is None:
        from modules import shared

        sd_model = shared.sd_model
    info = model.require_colorize_model(sd_model)
    version = info.version
    if info.family.is_xl:
        return prepare_xl(sd_model, info, options, sketch, box, tokens, seeds, size, device, dtype)
    modules = enhance_modules(sd_model, enhance.needed_parts(version, options), device, dtype)
    inputs = enhance.prepare_mask_inputs(options, sketch, box, mask_extractors())
    vae_dtype = getattr(devices, "dtype_vae", torch.float32)

    def vae_encode(image: torch.Tensor):
        # method-enhance Q10: the input in the VAE's own dtype (an fp16 VAE must not get fp32 images)
        return sd_model.encode_first_stage(image.to(device=device, dtype=vae_dtype))

    return enhance.prepare_enhance(
        version, options, modules, tokens, inputs,
        encode_local=lambda image: model.encode_reference_full(image)[:, 1:],
        vae_encode=vae_encode, seeds=seeds, size=size, cache=_cache, device=device, dtype=dtype)


def prepare_xl(sd_model, info, options, sketch, box, tokens, seeds, size, device, dtype):
    """The XL models' low-level injection of one sampling pass (:func:`lib_colorize.enhance_xl.prepare_xl_enhance`):
    the background context from the XL reference encoder, xlv2's LoRA and ReferenceNet banks from the file."""
    from lib_colorize import enhance
    from lib_colorize.enhance_xl import prepare_xl_enhance
    from modules import devices

    extractors = mask_extractors()
    inputs = enhance.prepare_mask_inputs(options, sketch, box, extractors)
    vae_dtype = getattr(devices, "dtype_vae", torch.float32)
    xlv2 = info.version == "xlv2"
    return prepare_xl_enhance(
        info.version, options, tokens, inputs, encode_context=model.encode_xl_reference,
        vae_encode=lambda image: model.first_stage_posterior(sd_model, image.to(device=device, dtype=vae_dtype)),
        seeds=seeds, size=size, cache=_cache, extractors=extractors,
        reference_net=(lambda: model.xlv2_reference_net(sd_model, device, dtype)) if xlv2 else None,
        reference_net_key=model.checkpoint_path(sd_model),
        loras=model.xlv2_loras(sd_model, device, dtype) if xlv2 else None,
        latent_scale=info.family.latent_scale, device=device, dtype=dtype)


def remove_background(image, options):
    """"Remove background in result" on one output image (method-enhance §4.5)."""
    from lib_colorize.enhance import remove_background as remove

    extractors = mask_extractors()
    return remove([image], lambda x: extractors.reference(options.reference_mask_extractor, x, dilated=False),
                  options.reference_mask_threshold)[0]


def clear_caches() -> None:
    with _lock:
        _modules.clear()
        _extractors.clear()
        _cache.clear()
