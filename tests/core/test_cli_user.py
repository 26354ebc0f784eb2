"""The command line as a new user meets it: ``python -m lib_colorize`` run as a subprocess, on tiny random
checkpoints and real files, checking exit codes, messages, the files on disk and their modes.

One test (or a small group) per point of "the command line and its install": install and models folder (1, 2),
what the user sees (3), checks before loading (4), the ``--clip-arch`` message (5), never losing work (6-13),
wrong values and mismatched files (14-16). Runs that fail before loading are started together; the runs that
colorize use one step at 64 px.
"""
from __future__ import annotations

import os
import pty
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_colorize.testing.checkpoints import make_checkpoint
from lib_colorize.testing.cli import draw_reference, draw_sketch, make_cli_files

REPO = Path(__file__).resolve().parents[2]
NEW_OPENCLIP = os.environ.get("CD_OPENCLIP_NEW")
LOADING = "loading checkpoint"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def no_traceback(self) -> "Result":
        assert "Traceback" not in self.err and "Traceback" not in self.out, self.err
        return self


def _env(home: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLORIZE_MODELS_DIR", "HF_ENDPOINT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start(args, cwd: Path, env: dict | None = None, umask: int = 0o022, fsize: int | None = None,
          terminal: bool = False, module: str = "lib_colorize"):
    """Start ``python -m lib_colorize ARGS``; ``terminal``: its stderr is a pseudo-terminal, as in a shell."""
    def limits():
        os.umask(umask)

    command = [sys.executable, "-m", module, *[str(a) for a in args]]
    if fsize is not None:   # torch writes a generated module while open_clip imports: limit our writes only
        command[1:3] = ["-c", "import open_clip, resource, runpy, sys; "
                              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
                              f"sys.argv[0] = {module!r}; runpy.run_module({module!r}, run_name='__main__')"]
    environment = _env(cwd / "hf-home", env or {})
    if not terminal:
        return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=limits), None
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=slave, text=True,
                            preexec_fn=limits)
    os.close(slave)
    chunks: list = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:   # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return proc, (reader, chunks)


def finish(started, timeout: int = 240) -> Result:
    proc, terminal = started
    out, err = proc.communicate(timeout=timeout)
    if terminal is not None:
        reader, chunks = terminal
        reader.join(timeout=30)
        err = b"".join(chunks).decode("utf-8", "replace")
    return Result(proc.returncode, out, err)


def run(args, cwd: Path, **kwargs) -> Result:
    return finish(start(args, cwd, **kwargs))


def run_together(cases, cwd: Path) -> list:
    """Several runs at once (each ``(args, kwargs)``); they fail before loading, so this is mostly imports."""
    started = [start(args, cwd, **kwargs) for args, kwargs in cases]
    return [finish(s) for s in started]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-user")
    made = make_cli_files(root / "weights")
    # valid key table (a ColorizeDiffusion U-Net and sketch encoder, context 32) but no loadable U-Net: any error
    # reported with it was found before loading
    from safetensors.torch import save_file

    unloadable = root / "weights" / "unloadable-eps.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 32),
               "control_encoder.weight": torch.zeros(1)}, str(unloadable))
    made["unloadable"] = str(unloadable)
    made["empty_models"] = root / "empty-models"
    made["empty_models"].mkdir()
    made["work"] = root
    return made


def tiny(files, *extra, checkpoint: str = "checkpoint"):
    """The arguments of a one-step 64 px run on the tiny models (no download: --clip-weights is a file)."""
    return ["--checkpoint", files[checkpoint], "--reference", files["reference"], "--clip-arch", files["clip_config"],
            "--clip-weights", files["clip_weights"], "--device", "cpu", "--steps", "1", "--sampler", "Euler",
            "--seed", "7", *extra]


@pytest.fixture(scope="module")
def generated(files):
    """One colorization of a 3:1 sketch with only --height, a batch of two and the processed sketch, into a
    folder named with a trailing slash; stderr is a log file (not a terminal); umask 022. With CD_OPENCLIP_NEW
    set it runs on open_clip 3.x."""
    work = files["work"] / "generated"
    work.mkdir()
    draw_sketch(work / "wide.png", size=(192, 64), seed=4)
    env = {}
    if NEW_OPENCLIP:
        env["PYTHONPATH"] = os.pathsep.join([NEW_OPENCLIP, str(REPO)])
    result = run(tiny(files, "--sketch", "wide.png", "--out", "outdir/", "--height", "64", "--batch-size", "2",
                      "--return-sketch"), work, env=env)
    return work, result


# ------------------------------------------------------------------------------------------------ 1, 2
def test_1_2_install_without_dependencies_and_the_models_folder_shown_by_help(files, tmp_path):
    """``pip install .`` of a copy of the tree (no dependencies fetched) gives a working ``colorize-diffusion``
    whose --help names the models folder in use: the Hugging Face cache, never the install folder; then
    $COLORIZE_MODELS_DIR; the webui's models folder when it runs from a webui's extensions/ folder."""
    from packaging.requirements import Requirement

    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "lib_colorize", source / "lib_colorize",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PIP_NO_INPUT="1"), timeout=240)
    if "invalid command 'bdist_wheel'" in pip.stderr:
        # setuptools < 70.1 without the `wheel` package cannot build offline: lay the package out as pip would
        shutil.copytree(source / "lib_colorize", target / "lib_colorize")
        command = [sys.executable, "-m", "lib_colorize"]
    else:
        assert pip.returncode == 0, pip.stderr[-3000:]
        command = [sys.executable, str(target / "bin" / "colorize-diffusion")]   # the installed command
    assert (target / "lib_colorize" / "cli" / "__init__.py").is_file()

    def help_text(env, package_dir=target):
        proc = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env=_env(tmp_path / "hf-home", dict(env, PYTHONPATH=str(package_dir), COLUMNS="10000")))
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "models").mkdir()
    extension = webui / "extensions" / "sd-webui-colorizediffusion"
    shutil.copytree(target / "lib_colorize", extension / "lib_colorize")
    default, from_env = help_text({}), help_text({"COLORIZE_MODELS_DIR": str(tmp_path / "my models")})
    in_webui = help_text({}, extension)
    assert f"Now: {tmp_path / 'hf-home' / 'hub'} (the Hugging Face cache)" in default
    assert str(target) not in default.split("Now:")[1].split(")")[0]
    assert f"Now: {tmp_path / 'my models'} ($COLORIZE_MODELS_DIR)" in from_env
    assert f"Now: {webui / 'models'} (the webui's models folder)" in in_webui
    assert "<name>-0.png" in default   # --batch-size documents the names it writes

    # the same tree works inside the webui: the package's requirements accept the webui's pinned versions
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    pins = dict(line.split("==") for line in (REPO / "requirements-test.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for requirement in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                           ["dependencies"]):
        pin = pins.get(requirement.name) or pins.get(requirement.name.replace("_", "-"))
        if pin:
            assert requirement.specifier.contains(pin), f"{requirement} refuses the webui's {requirement.name}=={pin}"


# ------------------------------------------------------------------------------------------------ 3
def test_3_a_run_says_what_it_loads_and_how_long_and_writes_plain_lines_to_a_log(generated):
    work, result = generated
    assert result.rc == 0, result.err
    result.no_traceback()
    lines = result.err.splitlines()
    assert any(line.startswith("loading checkpoint") and "mult-eps-ft.safetensors" in line for line in lines)
    assert any(line.startswith("loaded checkpoint (v1, eps) in ") and line.endswith(" s") for line in lines)
    assert any(line.startswith("loading OpenCLIP cd-tiny-clip (image tower and text tower)") for line in lines)
    assert any(line.startswith("loaded OpenCLIP cd-tiny-clip in ") for line in lines)
    assert "initialized randomly" not in result.err and "Warning" not in result.err
    assert "\r" not in result.err and "it/s" not in result.err, "no progress bars in a log"
    assert result.out.splitlines()[0].startswith("[1/1] wide.png: wrote ")


def test_3_progress_bars_are_drawn_on_a_terminal(files, tmp_path):
    """Also 6 (a page whose output is a folder is reported and the run goes on), 7 (same stems), 8 (a sub-folder
    of the input folder is fine), 10 (umask 027 gives 0640) and 11 (--verbose lists what is skipped)."""
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("a.png", "a.jpg", "b.png", "c.png"):
        draw_sketch(pages / name, size=(64, 64), seed=len(name) + ord(name[0]))
    (pages / "notes.txt").write_text("not a page")
    (pages / "drafts").mkdir()
    out = pages / "colorized"
    (out / "b.png").mkdir(parents=True)          # the output of b.png cannot be written: it is a folder
    result = run(tiny(files, "--sketch", pages, "--out", out, "--width", "64", "--height", "64", "--verbose"),
                 tmp_path, umask=0o027, terminal=True)
    assert result.rc == 1, result.err
    result.no_traceback()
    assert "\r" in result.err and "pages" in result.err, "a terminal gets progress bars"
    assert f"skipped {pages / 'notes.txt'}: not an image" in result.err
    assert f"skipped {pages / 'drafts'}: a folder" in result.err
    assert f"FAILED {pages / 'b.png'}: cannot write {out / 'b.png'}: it is a folder" in result.err
    assert "3 done, 0 skipped, 1 failed" in result.out
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png", "b.png", "c.png"]
    for name in ("a.jpg.png", "a.png.png", "c.png"):
        assert mode(out / name) == 0o640
    with Image.open(out / "a.jpg.png") as first, Image.open(out / "a.png.png") as second:
        assert "Seed: 7" in first.info["parameters"] and first.size == second.size == (64, 64)


def test_3_offline_without_a_file_fails_fast_and_suggests_offline(files, tmp_path):
    """A missing OpenCLIP file and no network: the download is tried at once, before any model is loaded, and
    the message names the file and suggests --offline; with --offline nothing is tried."""
    checkpoint = make_checkpoint(tmp_path / "mult-eps-wide.safetensors", version="v1", size="tiny",
                                 context_dim=1024)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()   # nothing listens there: every connection is refused
    args = ["--checkpoint", checkpoint, "--reference", files["reference"], "--sketch", files["reference"],
            "--out", tmp_path / "out.png", "--models-dir", files["empty_models"], "--device", "cpu"]
    online, offline = run_together([
        (args, {"env": {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}}),
        (args + ["--offline"], {})], tmp_path)
    for result in (online, offline):
        assert result.rc == 2 and LOADING not in result.err
        result.no_traceback()
        assert "open_clip_pytorch_model.bin" in result.err
        assert str(files["empty_models"] / "ColorizeDiffusion") in result.err
    assert "download failed" in online.err and "--offline" in online.err
    assert "downloads are off" in offline.err
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------------------------ 4
def test_4_errors_that_need_no_model_come_before_loading(files, tmp_path):
    """Each of these fails with its own message and exit 2 although the checkpoint would fail to load: so it was
    found before loading. The last run shows that loading that checkpoint does fail."""
    draw_sketch(tmp_path / "page.png")
    (tmp_path / "existing.png").write_bytes(b"keep me")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "a-file").write_text("x")
    base = tiny(files, checkpoint="unloadable")
    cases = {
        "existing output": (["--sketch", "page.png", "--out", "existing.png"], "existing.png exists; pass --overwrite"),
        "unreadable sketch": (["--sketch", "garbage.png", "--out", "o1.png"], "garbage.png is not a readable image"),
        "extractor weights": (["--sketch", "page.png", "--out", "o2.png", "--sketch-mode", "extract",
                               "--line-extractor", "lineart_keras", "--models-dir", files["empty_models"],
                               "--offline"], "sketchKeras.pth is not in"),
        "visualize": (["--visualize", "--out", "o3.png"], "give at least one --manipulation"),
        "output folder": (["--sketch", "page.png", "--out", "a-file/o4.png"], "a-file is a file, not a folder"),
        "the checkpoint": (["--sketch", "page.png", "--out", "o5.png"], "missing required key"),
    }
    results = run_together([(base + args, {}) for args, _ in cases.values()], tmp_path)
    for (name, (_, message)), result in zip(cases.items(), results):
        assert result.rc == 2, (name, result.err)
        assert message in result.err, (name, result.err)
        result.no_traceback()
        if name != "the checkpoint":
            assert LOADING not in result.err, name
    assert (tmp_path / "existing.png").read_bytes() == b"keep me"
    assert not any((tmp_path / f"o{i}.png").exists() for i in range(1, 6))


# ------------------------------------------------------------------------------------------------ 5, 14
def test_5_14_clip_architecture_messages(files, tmp_path):
    draw_sketch(tmp_path / "page.png")
    common = ["--checkpoint", files["checkpoint"], "--reference", files["reference"], "--sketch", "page.png",
              "--out", "o.png", "--device", "cpu", "--models-dir", files["empty_models"], "--offline"]
    needs_file, widths, unknown = run_together([
        (common + ["--clip-arch", "ViT-B-32"], {}),
        (common + ["--clip-arch", "ViT-B-32", "--clip-weights", files["clip_weights"]], {}),
        (common + ["--clip-arch", "ViT-Q-99"], {}),
    ], tmp_path)
    for result in (needs_file, widths, unknown):
        assert result.rc == 2 and LOADING not in result.err, result.err
        result.no_traceback()
    # 5: the file this architecture needs, not the ViT-H one
    assert "OpenCLIP ViT-B-32 weights" in needs_file.err and "open_clip_ViT-B-32.bin" in needs_file.err
    assert "ViT-H" not in needs_file.err and "open_clip_pytorch_model.bin is not" not in needs_file.err
    # 14: a checkpoint whose context width does not match the architecture names both widths
    assert "takes reference tokens 32 wide, but OpenCLIP ViT-B-32 gives tokens 512 wide" in widths.err
    assert "unknown open_clip architecture 'ViT-Q-99'" in unknown.err and "ViT-H-14" in unknown.err
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------ 6
def test_6_a_failed_write_is_reported_per_page_and_the_folder_run_goes_on(files, tmp_path):
    """A full disk (here: a file-size limit, so writes fail with EFBIG like ENOSPC) fails every page with its
    path and reason; nothing half-written stays behind."""
    pages = tmp_path / "pages"
    pages.mkdir()
    draw_sketch(pages / "01.png", size=(64, 64), seed=1)
    draw_sketch(pages / "02.png", size=(64, 64), seed=2)
    out = tmp_path / "out"
    out.mkdir()
    result = run(tiny(files, "--sketch", pages, "--out", out, "--width", "64", "--height", "64"), tmp_path,
                 fsize=2048)
    assert result.rc == 1, result.err
    result.no_traceback()
    for page in ("01.png", "02.png"):
        assert f"FAILED {pages / page}: cannot write {out / page}: File too large" in result.err
    assert "0 done, 0 skipped, 2 failed" in result.out
    assert list(out.iterdir()) == []


def test_6_12_a_trailing_slash_names_a_folder_and_the_batch_names_are_printed(generated):
    work, result = generated
    outdir = work / "outdir"
    names = ["wide-0.png", "wide-1.png", "wide-sketch.png"]
    assert sorted(p.name for p in outdir.iterdir()) == names
    assert f"wrote {', '.join('outdir/' + n for n in names)}" in result.out


# ------------------------------------------------------------------------------------------------ 8, 9
def test_8_9_inputs_and_existing_outputs_are_never_overwritten(files, tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    draw_sketch(pages / "01.png")
    sketch_bytes = (pages / "01.png").read_bytes()
    (tmp_path / "kept-sketch.png").write_bytes(b"an earlier extra")
    (tmp_path / "map.png").write_bytes(b"an earlier heat map")
    manipulation = ("[target] red hair; [anchor] none; [control] hair; [scale] 2.0; [enhanced] False; [ts0] 0.5; "
                    "[ts1] 0.55; [ts2] 0.65; [ts3] 0.95")
    cases = {
        "out is the input folder": (["--sketch", pages, "--out", pages], "is the sketch folder"),
        "out is the sketch": (["--sketch", pages / "01.png", "--out", pages / "01.png", "--overwrite"],
                              "is an input file"),
        "out is the reference": (["--sketch", pages / "01.png", "--out", files["reference"], "--overwrite"],
                                 "is an input file"),
        "an extra exists": (["--sketch", pages / "01.png", "--out", "kept.png", "--return-sketch"],
                            "kept-sketch.png exists; pass --overwrite"),
        "the heat map exists": (["--visualize", "--manipulation", manipulation, "--out", "map.png"],
                                "map.png exists; pass --overwrite"),
    }
    results = run_together([(tiny(files, *args), {}) for args, _ in cases.values()], tmp_path)
    for (name, (_, message)), result in zip(cases.items(), results):
        assert result.rc == 2 and message in result.err, (name, result.err)
        assert LOADING not in result.err, name
        result.no_traceback()
    assert (pages / "01.png").read_bytes() == sketch_bytes and sorted(os.listdir(pages)) == ["01.png"]
    assert (tmp_path / "kept-sketch.png").read_bytes() == b"an earlier extra" and not (tmp_path / "kept.png").exists()
    assert (tmp_path / "map.png").read_bytes() == b"an earlier heat map"


# ------------------------------------------------------------------------------------------------ 10, 16
def test_10_16_modes_follow_the_umask_and_one_side_keeps_the_aspect(generated):
    work, _ = generated
    for path in (work / "outdir").iterdir():
        assert mode(path) == 0o644, path
    with Image.open(work / "outdir" / "wide-0.png") as image:
        assert image.size == (192, 64), "--height 64 alone: the width keeps the sketch's 3:1"


# ------------------------------------------------------------------------------------------------ 11, 15, 16
def test_11_15_16_nothing_to_do_bad_devices_and_sizes(files, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pages here")
    draw_sketch(tmp_path / "page.png")
    cases = {
        "empty folder": (["--sketch", "empty", "--out", "o"], "sketch: empty holds no images"),
        "no images": (["--sketch", "notes", "--out", "o", "--verbose"], "skipped notes/readme.txt: not an image"),
        "unknown device": (["--sketch", "page.png", "--out", "o.png", "--device", "tpu"], "unknown device 'tpu'"),
        "negative width": (["--sketch", "page.png", "--out", "o.png", "--width", "-64"], "-64 must be positive"),
    }
    if not torch.cuda.is_available():
        cases["no GPU"] = (["--sketch", "page.png", "--out", "o.png", "--device", "cuda"], "CUDA is not available")
    results = run_together([(tiny(files, *args), {}) for args, _ in cases.values()], tmp_path)
    for (name, (_, message)), result in zip(cases.items(), results):
        assert result.rc == 2 and message in result.err, (name, result.err)
        result.no_traceback()
    assert "holds no images" in results[1].err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------ 13
def test_13_from_infotext_warns_when_the_images_differ(files, generated, tmp_path):
    work, _ = generated
    draw_sketch(tmp_path / "other.png", size=(192, 64), seed=9)
    other_reference = draw_reference(tmp_path / "other-reference.png", left=(10, 200, 10))
    args = ["--checkpoint", files["checkpoint"], "--clip-arch", files["clip_config"], "--clip-weights",
            files["clip_weights"], "--device", "cpu", "--from-infotext", work / "outdir" / "wide-0.png",
            "--steps", "1"]
    same, different = run_together([
        (args + ["--reference", files["reference"], "--sketch", work / "wide.png", "--out", "same.png"], {}),
        (args + ["--reference", other_reference, "--sketch", "other.png", "--out", "different.png"], {}),
    ], tmp_path)
    assert same.rc == 0 and different.rc == 0, (same.err, different.err)
    assert "warning" not in same.err
    assert "warning: the reference differs from the one" in different.err
    assert "warning: the sketch differs from the one" in different.err
    with Image.open(tmp_path / "different.png") as image:
        assert image.size == (192, 64), "the size recorded in the infotext is used"
