"""Stub of Forge's ``backend/utils.py`` (the attribute helpers ``patcher/base.py`` uses)."""


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, attr, value):
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def nested_compute_size(obj, element_size):
    return 0


def nested_move_to_device(obj, **kwargs):
    return obj
