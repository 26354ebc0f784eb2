"""Memory and time of loading one OpenCLIP tower: our loader against the whole-model way, side by side.

    python bench/clip_memory.py [--arch ViT-H-14] [--weights FILE] [--tower visual|text] [--format bin|safetensors]

* ours: ``lib_colorize.models.clip.load_clip(towers=(tower,))``: only that tower is built, on the meta device (no
  memory, no random initialisation), and filled from the file by assignment; only its tensors are read.
* whole model: what the library did before: ``open_clip.create_model(arch, pretrained=None)`` (both towers,
  randomly initialised in fp32), the whole state dict read with ``torch.load``, one tower loaded, the rest dropped.

Each way runs in a fresh process. For each it prints the resident growth (VmRSS after the load and a read of every
tensor, as the first encode does, minus before; memory-mapped file pages count), the peak growth (VmHWM after minus VmRSS before), the tower's parameter bytes
(:meth:`lib_colorize.models.clip.ClipEncoders.parameter_bytes`) and the seconds taken (load and that first read), then the ratios ours over
whole model, and one JSON line with every figure. Without ``--weights`` a file of random weights of ``--arch`` is
written to a temporary folder first (ViT-H-14: 3.9 GB on disk and as much memory while it is written).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child(way: str, arch: str, weights: str, tower: str) -> dict:
    import open_clip
    import torch

    from lib_colorize.models.clip import load_clip, split_state_dict
    from lib_colorize.module_info import parameter_bytes

    before = _status_kib("VmRSS")
    started = time.perf_counter()
    if way == "ours":
        loaded = load_clip(arch, weights=weights, towers=(tower,))
        module = loaded.reference if tower == "visual" else loaded.text
    else:
        model = open_clip.create_model(arch, pretrained=None)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        visual_sd, text_sd = split_state_dict(state)
        del state
        if tower == "visual":
            module = model.visual
            module.load_state_dict(visual_sd)
        else:
            module = model
            model.load_state_dict({**{"visual." + k: v for k, v in visual_sd.items()}, **text_sd}, strict=False)
            model.visual = None   # what the text encoder keeps is the rest
        del model, visual_sd, text_sd
    with torch.no_grad():   # read every tensor once, as the first encode does: memory-mapped pages become resident
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.sum()
    seconds = time.perf_counter() - started
    return {"resident_bytes": (_status_kib("VmRSS") - before) * 1024,
            "peak_bytes": (_status_kib("VmHWM") - before) * 1024,
            "parameter_bytes": parameter_bytes(module), "seconds": seconds}


def _random_weights(arch: str, folder: str, fmt: str) -> str:
    """A state dict of ``arch`` with random values, in open_clip's CLIP layout, saved as .bin or .safetensors."""
    import open_clip
    import torch

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in open_clip.create_model(arch, pretrained=None,
                                                                           device="meta").state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(dtype)
             for k, (shape, dtype) in shapes.items()}
    path = os.path.join(folder, f"random-{arch}.{fmt}")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def _measure(way: str, arch: str, weights: str, tower: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--arch", arch, "--weights", weights,
                           "--tower", tower], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{way} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-H-14")
    parser.add_argument("--weights", default=None, help="an open_clip weights file of --arch (default: random)")
    parser.add_argument("--tower", choices=("visual", "text"), default="visual")
    parser.add_argument("--format", choices=("bin", "safetensors"), default="bin",
                        help="format of the random weights file")
    parser.add_argument("--child", choices=("ours", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.arch, args.weights, args.tower)))
        return
    with tempfile.TemporaryDirectory(prefix="clip-memory-") as folder:
        if args.weights is None:
            sys.path.insert(0, str(REPO))
            args.weights = _random_weights(args.arch, folder, args.format)
        figures = {way: _measure(way, args.arch, args.weights, args.tower) for way in ("whole", "ours")}
    gib = 2 ** 30
    print(f"OpenCLIP {args.arch}, {args.tower} tower, from {os.path.basename(args.weights)}")
    print(f"{'':12}{'resident':>12}{'peak':>12}{'parameters':>12}{'seconds':>10}")
    for way, label in (("whole", "whole model"), ("ours", "ours")):
        f = figures[way]
        print(f"{label:12}{f['resident_bytes'] / gib:>10.2f}Gi{f['peak_bytes'] / gib:>10.2f}Gi"
              f"{f['parameter_bytes'] / gib:>10.2f}Gi{f['seconds']:>10.2f}")
    ratios = {f"{key}_ratio": figures["ours"][key] / figures["whole"][key]
              for key in ("resident_bytes", "peak_bytes", "seconds") if figures["whole"][key] > 0}
    print("ours / whole model: " + ", ".join(f"{k[:-6]} {v:.2f}" for k, v in ratios.items()))
    print(json.dumps({"arch": args.arch, "tower": args.tower, "ours": figures["ours"], "whole_model": figures["whole"],
                      **ratios}))


if __name__ == "__main__":
    main()
