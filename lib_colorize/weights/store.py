"""Finding a :class:`~lib_colorize.weights.files.WeightFile` on disk, or downloading it: the one offline check and
the one Hugging Face download of the project.

A file lives either in a folder (``folder / name`` for one of its accepted names) or, when no folder is given, in
the Hugging Face cache (``huggingface_hub``'s layout, shared with every other tool that uses the hub, so a file
already there is never fetched again). Downloads honour ``HF_HUB_OFFLINE`` (no network at all) and ``HF_ENDPOINT``
(a mirror) and report progress through a callback the host supplies.
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from urllib.parse import urlsplit
from pathlib import Path
from typing import Optional

from ..errors import MissingWeights
from .files import HF_ENDPOINT, WeightFile
from .progress import DownloadProgress, ProgressCallback, ProgressWatcher

PathLike = "str | os.PathLike[str]"
_STAGING = ".download-tmp"
#: Seconds between two progress reports of a running download.
PROGRESS_INTERVAL = 0.5


def downloads_disabled() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face cache in use (``HF_HUB_CACHE`` / ``HF_HOME``; ``~/.cache/huggingface/hub`` by default)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def _in_hub_cache(spec: WeightFile) -> Optional[Path]:
    if not spec.downloadable:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.hf_repo, spec.hf_filename, cache_dir=str(hub_cache_dir()))
    except Exception:  # no hub, or a cache it cannot read: the file is simply not there
        return None
    return Path(cached) if isinstance(cached, str) and os.path.isfile(cached) else None


def _proxy_configured() -> bool:
    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                                  "ALL_PROXY", "all_proxy"))


def unreachable(endpoint: Optional[str] = None, timeout: float = 5.0) -> Optional[str]:
    """Why the hub (``endpoint``, else ``HF_ENDPOINT``, else huggingface.co) cannot be reached, or None.

    One TCP connection, tried before the hub's own client, which retries for about half a minute when there is
    no network. Behind a proxy the answer is left to the client (None)."""
    if _proxy_configured():
        return None
    url = urlsplit(endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {url.scheme}://{url.netloc} ({error.strerror or error})"
    return None


def find_weight_file(spec: WeightFile, folder: "Optional[PathLike]" = None) -> Optional[Path]:
    """The existing file: the first accepted name in ``folder``; with no folder, the hub cache's copy. Else None."""
    if folder is None:
        return _in_hub_cache(spec)
    for name in spec.accepted_names:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def describe_location(spec: WeightFile, folder: "Optional[PathLike]") -> str:
    if folder is None:
        return f"the Hugging Face cache ({hub_cache_dir()})"
    return os.path.abspath(os.fspath(folder))


def missing_weights(spec: WeightFile, folder: "Optional[PathLike]", reason: str,
                    endpoint: Optional[str] = None) -> MissingWeights:
    """The error that says which file is missing, where it belongs, why it was not downloaded and where to get it."""
    size = f", {spec.size_text}" if spec.size_text else ""
    url = spec.url(endpoint)
    if folder is None:
        where = f"{spec.hf_repo}/{spec.hf_filename} is not in {describe_location(spec, folder)}"
        fix = (f"Download {url}{size} and put it into <models folder>/{spec.folder}/ as {spec.filename} "
               f"(give the models folder as --models-dir or COLORIZE_MODELS_DIR), or allow the download"
               if url else f"Put {spec.filename} into <models folder>/{spec.folder}/")
    else:
        target = os.path.join(os.path.abspath(os.fspath(folder)), spec.filename)
        where = f"{spec.filename} is not in {describe_location(spec, folder)}"
        fix = f"Download {url}{size} and save it as {target}" if url else f"Put it there as {target}"
    hint = f" {spec.hint}" if spec.hint else ""
    error = MissingWeights(f"ColorizeDiffusion: missing {spec.name}: {where} ({reason}). {fix}.{hint}")
    error.spec, error.reason = spec, reason
    return error


def ensure_weight_file(spec: WeightFile, folder: "Optional[PathLike]" = None, *, allow_download: bool = True,
                       progress: Optional[ProgressCallback] = None, endpoint: Optional[str] = None) -> Path:
    """The path of ``spec``: found in ``folder`` (or the hub cache when None), else downloaded there when allowed.

    Raises :class:`MissingWeights` without touching the network when downloads are off (``allow_download=False``
    or ``HF_HUB_OFFLINE``) or the file has no download source, and when the download fails.
    """
    found = find_weight_file(spec, folder)
    if found is not None:
        return found
    if not spec.downloadable:
        raise missing_weights(spec, folder, "it has no download source", endpoint)
    if not allow_download:
        raise missing_weights(spec, folder, "downloads are off", endpoint)
    if downloads_disabled():
        raise missing_weights(spec, folder, "HF_HUB_OFFLINE is set, so it was not downloaded", endpoint)
    return download_weight_file(spec, folder, progress=progress, endpoint=endpoint)


def download_weight_file(spec: WeightFile, folder: "Optional[PathLike]" = None, *,
                         progress: Optional[ProgressCallback] = None, endpoint: Optional[str] = None) -> Path:
    """Download ``spec`` with ``huggingface_hub.hf_hub_download``: into the hub cache when ``folder`` is None, else
    into a private staging folder first and then renamed to ``folder / spec.filename`` (a partial file never
    carries the final name, and an existing file is never overwritten by a failed download)."""
    extra = {"endpoint": endpoint} if endpoint else {}
    if folder is None:
        staging = None
        watched = hub_cache_dir() / ("models--" + spec.hf_repo.replace("/", "--"))  # the hub's cache layout
        destination = describe_location(spec, None)
    else:
        folder = Path(folder)
        staging = folder / _STAGING / f"{spec.filename}.{uuid.uuid4().hex[:8]}"
        watched = staging
        destination = str(folder.resolve() if folder.exists() else folder.absolute())
    event = DownloadProgress(name=spec.name, filename=spec.filename, destination=destination,
                             total=spec.size_bytes)
    offline = unreachable(endpoint)
    if offline:
        raise missing_weights(spec, folder, f"download failed: {offline}", endpoint)
    try:
        import huggingface_hub

        if staging is not None:
            staging.mkdir(parents=True, exist_ok=True)
            extra["local_dir"] = str(staging)
        with ProgressWatcher(progress, event, watched, PROGRESS_INTERVAL):
            path = huggingface_hub.hf_hub_download(repo_id=spec.hf_repo, filename=spec.hf_filename, **extra)
        if staging is None:
            return Path(path)
        target = folder / spec.filename
        os.replace(path, target)
        return target
    except Exception as error:  # network, HTTP, disk: the user's fix is the same (place the file by hand)
        raise missing_weights(spec, folder, f"download failed: {type(error).__name__}: {error}", endpoint) \
            from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging.parent.rmdir()
            except OSError:
                pass


__all__ = ["downloads_disabled", "unreachable", "hub_cache_dir", "find_weight_file", "ensure_weight_file", "download_weight_file",
           "missing_weights", "describe_location"]
