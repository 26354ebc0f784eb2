"""Stand-in ``modules.modelloader``: no network here; records the requested URLs.

``load_file_from_url`` returns the file when it is already in ``model_dir`` and raises otherwise (offline).
"""
import os

requested = []


def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
    requested.append((url, model_dir, file_name))
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(model_dir, file_name or os.path.basename(url)))
    if os.path.exists(path):
        return path
    raise OSError(f"stand-in: no network to download {url}")
