"""Download progress: the events a host receives, and the watcher that produces them.

``huggingface_hub.hf_hub_download`` draws its own console bar but offers no callback. While it runs, a watcher
thread sums the sizes of the hub's partial files (``*.incomplete``, in the download's staging folder or in the
repository's cache folder) and reports them. Should a hub version name its partial files differently, the host
still gets the start and end events, only no byte counts in between.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class DownloadProgress:
    """One progress event. ``done``/``total`` in bytes (``total`` None when unknown); ``finished`` on the last event
    of a download, whether it succeeded (``ok``) or failed."""

    name: str
    filename: str
    destination: str
    done: int = 0
    total: Optional[int] = None
    finished: bool = False
    ok: bool = True

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


#: What a host passes to receive :class:`DownloadProgress` events (CLI: status lines; webui: the progress text).
ProgressCallback = Callable[[DownloadProgress], None]


def partial_bytes(folder: Path) -> int:
    """Bytes in the hub's partial download files under ``folder`` (0 when there are none)."""
    total = 0
    try:
        for path in folder.rglob("*.incomplete"):
            try:
                total += path.stat().st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


class ProgressWatcher:
    """``with ProgressWatcher(callback, event, folder):`` reports ``event`` with the growing partial size of the
    download under ``folder`` every ``interval`` seconds; the exit reports the final event (``finished``)."""

    def __init__(self, callback: Optional[ProgressCallback], event: DownloadProgress, folder: Path,
                 interval: float = 0.5):
        self.callback = callback
        self.event = event
        self.folder = folder
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _report(self, **changes) -> None:
        if self.callback is None:
            return
        values = dict(self.event.__dict__, **changes)
        try:
            self.callback(DownloadProgress(**values))
        except Exception:  # a broken progress display must never break the download
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            done = partial_bytes(self.folder)
            if done:
                self._report(done=done)

    def __enter__(self) -> "ProgressWatcher":
        self._report()
        if self.callback is not None:
            self._thread = threading.Thread(target=self._run, name="colorize-download-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        done = (self.event.total or 0) if exc_type is None else partial_bytes(self.folder)
        self._report(done=done, finished=True, ok=exc_type is None)


def line_progress(write: Callable[[str], None]) -> ProgressCallback:
    """A callback that writes one line when a download starts and one when it ends (with its duration): what a
    log file or a terminal should show next to the hub's own bar."""
    started: dict = {}

    def report(event: DownloadProgress) -> None:
        key = (event.filename, event.destination)
        if event.finished:
            seconds = time.monotonic() - started.pop(key, time.monotonic())
            if event.ok:
                write(f"downloaded {event.filename} in {seconds:.0f} s")
        elif key not in started:
            started[key] = time.monotonic()
            from .files import format_bytes

            size = f" ({format_bytes(event.total)})" if event.total else ""
            write(f"downloading {event.name}: {event.filename}{size} into {event.destination}")

    return report


__all__ = ["DownloadProgress", "ProgressCallback", "ProgressWatcher", "line_progress", "partial_bytes"]
