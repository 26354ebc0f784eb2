"""What a downloadable weight file is: :class:`WeightFile`, one record per file the method can fetch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class WeightFile:
    """One weight file: what it is, its local name, the sub-folder of the models folder it belongs in, and where it
    is downloaded from on the Hugging Face Hub.

    ``local_names``: names accepted in the folder, in order of preference (``filename``, the name a download is
    saved as, is accepted whether or not it is listed). ``size_bytes``: approximate size, for messages and progress.
    ``hint``: one more sentence for the "missing" message (e.g. an alternative that needs no file).
    """

    name: str
    filename: str
    folder: str
    hf_repo: Optional[str] = None
    hf_filename: Optional[str] = None
    local_names: tuple[str, ...] = ()
    size_bytes: Optional[int] = None
    licence: str = ""
    hint: str = ""

    @property
    def accepted_names(self) -> tuple[str, ...]:
        names = tuple(self.local_names)
        return names if self.filename in names else names + (self.filename,)

    @property
    def downloadable(self) -> bool:
        return bool(self.hf_repo and self.hf_filename)

    def url(self, endpoint: Optional[str] = None) -> Optional[str]:
        """Direct download address on ``endpoint``, else on ``HF_ENDPOINT`` (a mirror), else on the hub."""
        if not self.downloadable:
            return None
        base = endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
        return f"{base.rstrip('/')}/{self.hf_repo}/resolve/main/{self.hf_filename}"

    @property
    def source_url(self) -> Optional[str]:
        """The address on huggingface.co itself."""
        return self.url(HF_ENDPOINT)

    @property
    def size_text(self) -> str:
        return format_bytes(self.size_bytes) if self.size_bytes else ""


def format_bytes(count: float) -> str:
    """``3.9 GB``, ``12.0 MB``, ``512 B`` (decimal units, as download sites show sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


__all__ = ["WeightFile", "HF_ENDPOINT", "format_bytes"]
