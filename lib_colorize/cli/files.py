"""Writing an output PNG: whole or not at all, with the permissions the user's umask gives new files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


class WriteFailed(Exception):
    """An output could not be written; ``str()`` names the path and the reason (permission, disk full, ...)."""

    def __init__(self, path: Path, error: OSError):
        self.path = path
        super().__init__(f"cannot write {path}: {error.strerror or error}")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image, path: Path, parameters: Optional[str] = None) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written PNG under the final name.

    The file gets mode ``0o666 & ~umask`` like any new file (a temporary file alone would be 0600). Raises
    :class:`WriteFailed`; nothing is left behind then.
    """
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        raise WriteFailed(path, error) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["WriteFailed", "current_umask", "save_png"]
