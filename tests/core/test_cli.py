"""The command line end to end on a small random checkpoint in the released key layout and a small open_clip
architecture: single file, folder of three (one unreadable), outputs (size, crop, metadata), determinism,
resume / overwrite rules, --from-infotext, exit codes. ``test_cli_user.py`` runs it as a user does, as a
subprocess."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_colorize.cli import main
from lib_colorize.testing.cli import draw_sketch, make_cli_files
from lib_colorize.testing.clip import TINY_CLIP_NAME

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_cli_files(tmp_path_factory.mktemp("models"))


def base_args(models, sketch, out, *extra):
    return ["--checkpoint", models["checkpoint"], "--reference", models["reference"], "--sketch", str(sketch),
            "--out", str(out), "--clip-arch", TINY_CLIP_NAME, "--clip-weights", models["clip_weights"],
            "--models-dir", str(models["root"]), "--offline", "--device", "cpu", "--steps", "2",
            "--sampler", "Euler", "--seed", "42", *extra]


def infotext_args(models, sketch, out, result_png):
    """Only the files, the machine and ``--from-infotext``: everything else comes from the result's parameters."""
    return ["--checkpoint", models["checkpoint"], "--reference", models["reference"], "--sketch", str(sketch),
            "--out", str(out), "--clip-arch", TINY_CLIP_NAME, "--clip-weights", models["clip_weights"],
            "--models-dir", str(models["root"]), "--offline", "--device", "cpu", "--from-infotext", str(result_png)]


def test_single_file_size_metadata_and_determinism(models, tmp_path, capsys):
    sketch = draw_sketch(tmp_path / "page.png")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(base_args(models, sketch, first, "--width", "128", "--height", "64",
                          "--reference-guidance", "3", "--sketch-guidance", "1.5")) == 0
    assert main(base_args(models, sketch, second, "--width", "128", "--height", "64",
                          "--reference-guidance", "3", "--sketch-guidance", "1.5")) == 0
    with Image.open(first) as a, Image.open(second) as b:
        assert a.size == (128, 64)
        assert np.array_equal(np.asarray(a), np.asarray(b)), "same seed and options must give the same image"
        text = a.info["parameters"]
    assert "CD reference guidance: 3" in text and "Seed: 42" in text and "Size: 128x64" in text
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_default_size_keeps_the_sketch_aspect_and_crop_result(models, tmp_path):
    sketch = draw_sketch(tmp_path / "wide.png", size=(300, 100))
    out = tmp_path / "wide-out.png"
    assert main(base_args(models, sketch, out)) == 0
    with Image.open(out) as image:
        width, height = image.size
    assert width % 64 == 0 and height % 64 == 0 and width > height   # native 512², aspect about 3:1
    cropped = tmp_path / "cropped.png"
    assert main(base_args(models, sketch, cropped, "--width", "128", "--height", "128", "--crop-result")) == 0
    with Image.open(cropped) as image:
        assert image.size == (128, 42)   # the sketch's box inside the 128x128 canvas


def test_from_infotext_reproduces_the_result(models, tmp_path):
    sketch = draw_sketch(tmp_path / "page.png", seed=3)
    first = tmp_path / "first.png"
    assert main(base_args(models, sketch, first, "--width", "64", "--height", "64", "--injection",
                          "--layer-scales", *["0.5"] * 16, "--manipulation",
                          "[target] red hair; [anchor] none; [control] hair; [scale] 2.0; [enhanced] False; "
                          "[ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95")) == 0
    again = tmp_path / "again.png"
    assert main(infotext_args(models, sketch, again, first)) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert "CD injection: True" in b.info["parameters"]


def test_every_webui_sampler_and_schedule_is_listed_and_an_sde_result_reproduces(models, tmp_path, capsys):
    """``--help`` lists the webui's samplers and schedule types; DPM++ 3M SDE (the original app's default, with
    its Brownian-tree noise) runs from the command line and ``--from-infotext`` gives the same image again."""
    from lib_colorize.samplers import SAMPLERS, SCHEDULES

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("DPM++ 3M SDE", "DPM++ SDE", "Heun", "LMS", "DPM2", "DPM2 a", *SAMPLERS, *SCHEDULES):
        assert name in text, name
    sketch = draw_sketch(tmp_path / "page.png", seed=4)
    first = tmp_path / "first.png"
    assert main(base_args(models, sketch, first, "--width", "64", "--height", "64", "--sampler", "DPM++ 3M SDE",
                          "--schedule", "Karras")) == 0
    again = tmp_path / "again.png"
    assert main(infotext_args(models, sketch, again, first)) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert "Sampler: DPM++ 3M SDE" in b.info["parameters"] and "Schedule type: Karras" in b.info["parameters"]
    assert main(base_args(models, sketch, tmp_path / "bad.png", "--height", "64", "--schedule", "Cosine")) == 2
    assert "Align Your Steps" in capsys.readouterr().err


def test_folder_run_reports_failures_resumes_and_never_overwrites(models, tmp_path, capsys):
    pages = tmp_path / "pages"
    pages.mkdir()
    draw_sketch(pages / "01.png", seed=1)
    draw_sketch(pages / "02.png", seed=2)
    (pages / "03.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = main(base_args(models, pages, out, "--width", "64", "--height", "64"))
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["01.png", "02.png"]
    assert "03.png" in captured.err and "not a readable image" in captured.err
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code = main(base_args(models, pages, out, "--width", "64", "--height", "64", "--resume"))
    captured = capsys.readouterr()
    assert code == 1 and "0 done, 2 skipped, 1 failed" in captured.out
    code = main(base_args(models, pages, out, "--width", "64", "--height", "64"))
    captured = capsys.readouterr()
    assert code == 1 and "--overwrite" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes, "nothing overwritten"
    (pages / "03.png").unlink()
    assert main(base_args(models, pages, out, "--width", "64", "--height", "64", "--overwrite")) == 0


@pytest.mark.parametrize("flag,value,field", [("--reference-guidance", "99", "reference_guidance"),
                                              ("--width", "100", "width"), ("--pad-reference", "nan", "pad_reference")])
def test_bad_options_exit_2_with_the_field_named(models, tmp_path, capsys, flag, value, field):
    sketch = draw_sketch(tmp_path / "page.png")
    code = main(base_args(models, sketch, tmp_path / "x.png", "--height", "64", flag, value))
    assert code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_offline_missing_checkpoint_names_file_and_folder(models, tmp_path, capsys):
    sketch = draw_sketch(tmp_path / "page.png")
    args = base_args(models, sketch, tmp_path / "x.png")
    args[1] = "switch-eps"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "switch-eps.safetensors" in err and "Stable-diffusion" in err


@pytest.mark.parametrize("extractor", ["lineart_standard", "lineart_keras"])
def test_coloured_image_with_extract_goes_through_the_cli(models, tmp_path, extractor):
    """A coloured image as the sketch (the "extract" preprocessor), cleaned up by a line extractor, end to end.
    The learned extractor gets random weights in its public key layout, placed where users put the real file."""
    import torch

    from lib_colorize.extractors import EXTRACTORS, unload_extractors
    from lib_colorize.extractors.sketch_keras import build_network

    models_dir = tmp_path / "models"
    (models_dir / "ColorizeDiffusion").mkdir(parents=True)
    if EXTRACTORS[extractor].needs_weights:
        torch.manual_seed(0)
        torch.save(build_network().state_dict(),
                   models_dir / "ColorizeDiffusion" / EXTRACTORS[extractor].weight_file)
    unload_extractors()
    coloured = tmp_path / "coloured.png"
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :48] = (230, 180, 90)
    pixels[20:44, 30:70] = (30, 60, 160)
    Image.fromarray(pixels).save(coloured)
    out = tmp_path / "out.png"
    args = base_args(models, coloured, out, "--width", "64", "--height", "64", "--sketch-mode", "extract",
                     "--line-extractor", extractor, "--return-sketch")
    args[args.index("--models-dir") + 1] = str(models_dir)
    assert main(args) == 0
    with Image.open(tmp_path / "out-sketch.png") as sketch:
        lines = np.asarray(sketch.convert("L"))
    assert lines.shape == (64, 64)
    if extractor == "lineart_standard":   # random weights draw no meaningful lines; the model-free one does
        assert lines.min() < 128 < lines.max(), "the extracted line art has lines and background"
    with Image.open(out) as image:
        assert "CD sketch mode: extract" in image.info["parameters"]
        assert f"CD line extractor: {extractor}" in image.info["parameters"]
    unload_extractors()
