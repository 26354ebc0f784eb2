"""Every enhance mode from the command line on tiny random checkpoints of each version (v1, v1.5 switch, v2), with
random IS-Net mask extractors in models/ColorizeDiffusion: exit code, infotext, and an image that differs from the
default mode; a flag the model cannot honour is refused naming the key and the version it needs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_colorize.cli import main
from lib_colorize.testing.checkpoints import make_checkpoint
from lib_colorize.testing.clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_tiny_clip_weights, register_tiny_clip
from lib_colorize.testing.masks import make_mask_extractor_files

NAMES = {"v1": "mult-eps-ft", "v1.5": "switch-eps", "v2": "v2-full"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhance-cli")
    register_tiny_clip()
    clip = make_tiny_clip_weights(str(root / "tiny_clip.bin"))
    make_mask_extractor_files(root / "ColorizeDiffusion", divisor=16)
    out = {"clip": clip, "root": root}
    for version, name in NAMES.items():
        out[version] = make_checkpoint(root / f"{name}.safetensors", version=version, size="tiny",
                                       context_dim=TINY_CLIP_CONFIG["embed_dim"], seed=2)
    rng = np.random.default_rng(0)
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[::9] = 0
    sketch[:, ::11] = 0
    Image.fromarray(sketch).save(root / "sketch.png")
    Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(root / "reference.png")
    Image.fromarray(rng.integers(0, 255, (56, 48, 3), dtype=np.uint8)).save(root / "background.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :30] = 255
    Image.fromarray(mask).save(root / "sketch-mask.png")
    Image.fromarray(mask[:48, :56]).save(root / "reference-mask.png")
    return out


def run(files, version, out, *extra):
    root = files["root"]
    return main(["--checkpoint", files[version], "--reference", str(root / "reference.png"),
                 "--sketch", str(root / "sketch.png"), "--out", str(out), "--clip-arch", TINY_CLIP_NAME,
                 "--clip-weights", files["clip"], "--models-dir", str(root), "--offline", "--device", "cpu",
                 "--steps", "2", "--sampler", "Euler", "--seed", "3", "--width", "64", "--height", "64",
                 "--reference-guidance", "3", *extra])


@pytest.fixture(scope="module")
def defaults(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("defaults")
    out = {}
    for version in NAMES:
        assert run(files, version, folder / f"{version}.png") == 0
        out[version] = np.asarray(Image.open(folder / f"{version}.png")).astype(int)
    return out


MASK, REFERENCE_MASK = "--sketch-mask", "--reference-mask"
CASES = [
    ("v1", ["--bg-enhance", MASK, REFERENCE_MASK], ["CD BG enhance: True", "CD reference mask hash"]),
    ("v1", ["--bg-enhance", "--background", MASK, "--foreground-strength", "0.6"], ["CD foreground strength: 0.6"]),
    ("v1.5", ["--bg-enhance"], ["CD BG enhance: True", "CD reference mask extractor: ISNet"]),   # extracted masks
    ("v1.5", ["--bg-enhance", "--background", MASK], ["CD background hash"]),
    ("v1.5", ["--fg-enhance", MASK], ["CD FG enhance: True"]),
    ("v1.5", ["--fg-enhance", "--bg-enhance", MASK, "--merging-scale", "0.3"], ["CD merging scale: 0.3"]),
    ("v2", ["--style-enhance"], ["CD style enhance: True"]),
    ("v2", ["--style-enhance", "--background", "--merging-scale", "0.5"], ["CD style enhance: True"]),
    ("v2", ["--bg-enhance", MASK, "--background-factor", "1.5", "--return-masks"], ["CD background factor: 1.5"]),
    ("v2", ["--bg-enhance", "--background", "--remove-foreground", MASK], ["CD remove foreground: True"]),
    ("v2", ["--fg-enhance", MASK, "--foreground-strength", "0.5", "--remove-background"],
     ["CD FG enhance: True", "CD remove background: True"]),
]


@pytest.mark.parametrize("version,flags,keys", CASES, ids=[f"{v}:{' '.join(f for f in fl if f.startswith('--'))}"
                                                             for v, fl, _ in CASES])
def test_each_mode_runs_writes_its_infotext_and_changes_the_image(files, defaults, tmp_path, version, flags, keys):
    root = files["root"]
    args = []
    for flag in flags:
        args.append(flag)
        if flag == "--background":
            args.append(str(root / "background.png"))
        elif flag == MASK:
            args.append(str(root / "sketch-mask.png"))
        elif flag == REFERENCE_MASK:
            args.append(str(root / "reference-mask.png"))
    out = tmp_path / "out.png"
    assert run(files, version, out, *args) == 0
    with Image.open(out) as image:
        text = image.info["parameters"]
        pixels = np.asarray(image).astype(int)
    for key in keys:
        assert key in text, (key, text)
    assert np.abs(pixels - defaults[version]).max() > 8, "the mode must change the image"
    if "--return-masks" in flags:
        with Image.open(tmp_path / "out-mask0.png") as mask:
            assert mask.size == (64, 64) and mask.mode == "L"
            assert np.asarray(mask)[:, :20].min() == 255 and np.asarray(mask)[:, 40:].max() == 0
    if "--remove-background" in flags:
        assert (pixels == 255).all(axis=-1).any(), "remove background whitens some pixels"


@pytest.mark.parametrize("version,flag,needs", [("v1", "--style-enhance", "v2"), ("v1", "--fg-enhance", "v1.5"),
                                                 ("v1.5", "--style-enhance", "v2")])
def test_a_mode_the_model_cannot_honour_is_refused_naming_key_and_version(files, tmp_path, capsys, version, flag,
                                                                         needs):
    assert run(files, version, tmp_path / "x.png", flag) == 2
    err = capsys.readouterr().err
    assert flag[2:].replace("-", "_") in err and needs in err and not (tmp_path / "x.png").exists()
    assert run(files, "v1", tmp_path / "y.png", "--background-factor", "1.5") == 2
    assert "background_factor" in capsys.readouterr().err


def test_help_lists_the_enhance_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--style-enhance", "--bg-enhance", "--fg-enhance", "--background", "--sketch-mask",
                 "--reference-mask", "--foreground-strength", "--background-strength", "--merging-scale",
                 "--background-factor", "--reference-mask-threshold", "--sketch-mask-threshold",
                 "--reference-mask-extractor", "--remove-foreground", "--remove-background", "--return-masks"):
        assert flag in text, flag
