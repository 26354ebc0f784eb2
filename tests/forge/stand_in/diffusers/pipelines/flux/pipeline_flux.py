"""Stub (see ../../__init__.py)."""


def calculate_shift(*args, **kwargs):
    raise NotImplementedError
