"""Stub of Forge's ``backend/operations.py``: layers are plain torch layers here."""
import contextlib


@contextlib.contextmanager
def using_forge_operations(device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    yield


def cleanup_cache():
    return None
