"""The XL reference encoder: CLIP ViT-bigG-14 + WD tagger + ``ClusterConcat`` -> 196 context tokens (method-xl §3).

``encode_full(reference (1, 3, H, W) in [-1, 1]) -> (1, 196, 2048)`` = ``projector(clip(r), tagger(r))``.

Staged loading (method-xl §9, "memory"): the two encoders (1.84 B and 0.1 B parameters) are needed once per
reference. Each comes from a loader and visits the compute device only for its encode; afterwards it goes back to the
CPU (``keep="cpu"``) or is dropped altogether (``keep="none"``, the default on a CPU-only machine, where "off the
device" frees nothing). :attr:`stages` records the parameter bytes resident on the compute device in each stage,
for the memory bench.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
from torch import nn

from ..memory import release_memory

KEEP_MODES = ("device", "cpu", "none")
_instance_ids = itertools.count()


def parameter_bytes(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class XLReferenceEncoder:
    """See the module docstring. ``load_clip``/``load_tagger`` return the encoders (on the CPU or the device)."""

    def __init__(self, load_clip: Callable[[], nn.Module], load_tagger: Callable[[], nn.Module],
                 projector: nn.Module, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32,
                 keep: Optional[str] = None):
        self.device = torch.device(device)
        keep = keep or ("none" if self.device.type == "cpu" else "cpu")
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
        self.keep = keep
        self.dtype = dtype
        self._loaders = {"clip": load_clip, "tagger": load_tagger}
        self._loaded: dict = {}
        self.projector = projector
        self.instance_id = next(_instance_ids)
        self.stages: list = []
        self.encode_calls = 0
        self._probe = torch.empty(0, dtype=dtype, device=self.device)

    # ReferenceTokenCache keys on the dtype and device the encoder computes in
    def parameters(self):
        yield self._probe

    def _encoder(self, name: str) -> nn.Module:
        module = self._loaded.get(name)
        if module is None:
            module = self._loaders[name]()
            if self.keep != "none":
                self._loaded[name] = module
        return module.to(device=self.device, dtype=self.dtype)

    def _release(self, name: str, module: nn.Module) -> None:
        if self.keep == "cpu" and self.device.type != "cpu":
            module.to("cpu")
        elif self.keep == "none":
            self._loaded.pop(name, None)

    def _stage(self, name: str, module: Optional[nn.Module]) -> None:
        self.stages.append({"stage": name, "parameter_bytes": parameter_bytes(module)
                            + parameter_bytes(self.projector)})

    @torch.no_grad()
    def encode_parts(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP tokens (1, 257, 1280), WD tokens (1, 196, 1024)) of a reference in [-1, 1]."""
        reference = reference.float()
        outputs = []
        for name, call in (("clip", "encode_full"), ("tagger", "encode")):
            module = self._encoder(name)
            try:
                self._stage(name, module)
                outputs.append(getattr(module, call)(reference.to(self.device)))
            finally:
                self._release(name, module)
                del module
                if self.keep == "none":
                    release_memory()
        return outputs[0], outputs[1]

    @torch.no_grad()
    def encode_full(self, reference: torch.Tensor) -> torch.Tensor:
        clip_tokens, wd_tokens = self.encode_parts(reference)
        projector = self.projector.to(self.device)
        self.encode_calls += 1
        return projector(clip_tokens, wd_tokens)


def xl_reference_encoder(projector: nn.Module, models_dir: str, *, allow_download: bool = True,
                         device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32,
                         keep: Optional[str] = None, progress=None, endpoint: Optional[str] = None,
                         clip_config: Optional[dict] = None, tagger_arch: Optional[dict] = None) -> XLReferenceEncoder:
    """The XL reference encoder over the weight files in ``models_dir`` (None: the Hugging Face cache), found or
    downloaded first, so a missing file is reported before any model is loaded (:mod:`lib_colorize.weights`;
    ``progress`` receives the download's events). ``clip_config`` / ``tagger_arch``: other architectures than
    the released ones (reduced test widths)."""
    from ..weights import CLIP_BIGG, WD_TAGGER, ensure_weight_file
    from .clip_xl import load_clip_bigg
    from .tagger import load_tagger

    clip_path = ensure_weight_file(CLIP_BIGG, models_dir, allow_download=allow_download, endpoint=endpoint,
                                   progress=progress)
    tagger_path = ensure_weight_file(WD_TAGGER, models_dir, allow_download=allow_download, endpoint=endpoint,
                                     progress=progress)
    return XLReferenceEncoder(lambda: load_clip_bigg(clip_path, dtype=dtype, config=clip_config),
                              lambda: load_tagger(tagger_path, dtype=dtype, arch=tagger_arch),
                              projector, device=device, dtype=dtype, keep=keep)
