"""Random IS-Net weight files in the released layout (``sketch-segment.safetensors``, ``isnetis.safetensors``),
for tests and smoke runs without the real mask extractors.

``make_isnet_weights(path, divisor=8)`` writes a network with the released widths divided by ``divisor``
(``divisor=1``: full size, about 44 M parameters); BatchNorm statistics are randomised too, so the network is
not the identity of its initialisation. Command line: ``python -m lib_colorize.testing.masks --out DIR``.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from ..masks import MASK_EXTRACTORS, REFERENCE_MASK_EXTRACTORS, SKETCH_MASK_EXTRACTOR
from ..masks.isnet import ISNet


def make_isnet_weights(path: "str | os.PathLike[str]", divisor: int = 8, seed: int = 0) -> str:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = ISNet(ISNet.scaled_widths(divisor), stem=max(1, 64 // divisor))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.fspath(path))
    return os.fspath(path)


def make_mask_extractor_files(folder: "str | os.PathLike[str]", divisor: int = 8) -> list:
    """Both IS-Net files (sketch and reference extractor) under their released names in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    names = [SKETCH_MASK_EXTRACTOR] + [n for n in REFERENCE_MASK_EXTRACTORS if not MASK_EXTRACTORS[n].gated]
    return [make_isnet_weights(os.path.join(folder, MASK_EXTRACTORS[n].weight_file), divisor, seed=i)
            for i, n in enumerate(names)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_colorize.testing.masks",
                                     description="Write random IS-Net mask-extractor weights in the released layout.")
    parser.add_argument("--out", required=True, help="folder (models/ColorizeDiffusion)")
    parser.add_argument("--divisor", type=int, default=1, help="divide the released widths (1 = full size)")
    args = parser.parse_args(argv)
    for path in make_mask_extractor_files(args.out, args.divisor):
        print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
