"""Which pages a run colorizes and what it writes for each, decided before any model is loaded.

Naming rule: a page ``p`` gives ``<out>/<stem of p>.png``; pages that share a stem (``a.png``, ``a.jpg``) give
``<out>/<name of p>.png`` (``a.png.png``, ``a.jpg.png``), so neither overwrites the other. ``--batch-size N`` turns
``x.png`` into ``x-0.png`` .. ``x-(N-1).png``; ``--return-sketch`` / ``--return-heatmap`` add ``x-sketch.png`` /
``x-heatmap.png``. No output may be an input file (a sketch, the reference, the ``--from-infotext`` PNG), even
with ``--overwrite``; an existing output is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import InvalidInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Page:
    """One sketch and its outputs. ``images``: one path per batch image; ``extras``: kind -> path."""

    source: Path
    images: list
    extras: dict = field(default_factory=dict)
    refusal: Optional[str] = None   # why the page is not colorized (decided before loading)
    skip: bool = False              # --resume and its outputs exist

    @property
    def outputs(self) -> list:
        return list(self.images) + list(self.extras.values())


def list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other entries) of ``folder``, sorted by name; sub-folders are not searched."""
    pages, others = [], []
    for path in sorted(folder.iterdir()):
        (pages if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return pages, others


def output_stems(pages: Sequence[Path]) -> dict:
    """page -> output name without ``.png``: the stem, or the whole file name where stems are shared."""
    counts = Counter(page.stem for page in pages)
    return {page: page.stem if counts[page.stem] == 1 else page.name for page in pages}


def outputs_for(source: Path, target: Path, batch_size: int, extras: Iterable[str]) -> Page:
    """The :class:`Page` of ``source`` whose (first) output is ``target``."""
    suffix = target.suffix or ".png"
    images = [target] if batch_size == 1 else [target.with_name(f"{target.stem}-{i}{suffix}")
                                               for i in range(batch_size)]
    return Page(source, images, {kind: target.with_name(f"{target.stem}-{kind}.png") for kind in extras})


def single_target(sketch: Path, out: str) -> Path:
    """``--out`` for one sketch: the file itself, or ``<out>/<stem>.png`` when it names a folder (an existing one,
    or a name ending in a path separator)."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / f"{sketch.stem}.png"
    return Path(out)


def _same(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_an_input(page: Page, inputs: Sequence[Path]) -> None:
    for output in page.outputs:
        for source in inputs:
            if _same(output, source):
                raise InvalidInput("out", f"{output} is an input file ({source}); it is never overwritten, even "
                                          f"with --overwrite. Choose another --out")


def check_folder_out(sketches: Path, out: Path) -> None:
    """A folder run may not write into the sketch folder itself: its outputs would be taken as pages next time.
    (A sub-folder is fine: folders are not searched recursively.)"""
    if _same(sketches, out):
        raise InvalidInput("out", f"--out {out} is the sketch folder: the outputs would be read as pages on the "
                                  f"next run. Use another folder, e.g. {out / 'colorized'}")


def check_writable(folder: Path) -> None:
    """``folder`` is, or can be created as, a folder this process may write into."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput("out", f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInput("out", f"cannot write into {folder}: {existing} is not writable (permission denied)")


def decide(pages: Sequence[Page], *, resume: bool, overwrite: bool) -> None:
    """Mark each page to colorize, to skip (``--resume``) or refused (an output exists, or two pages would write
    the same file)."""
    claimed: dict = {}
    for page in pages:
        for output in page.outputs:
            other = claimed.setdefault(os.path.realpath(output), page.source)
            if other != page.source:
                page.refusal = f"its output {output} is also the output of {other}; rename one of them"
        if page.refusal:
            continue
        folders = [path for path in page.outputs if path.is_dir()]
        if folders:
            page.refusal = f"cannot write {folders[0]}: it is a folder"
            continue
        existing = [path for path in page.outputs if path.exists()]
        if resume and existing and all(path.exists() for path in page.images):
            page.skip = True
        elif existing and not overwrite:
            page.refusal = f"{existing[0]} exists; pass --overwrite to replace it or --resume to skip"


__all__ = ["IMAGE_SUFFIXES", "Page", "list_folder", "output_stems", "outputs_for", "single_target",
           "check_not_an_input", "check_folder_out", "check_writable", "decide"]
