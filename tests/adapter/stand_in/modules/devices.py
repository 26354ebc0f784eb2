"""Stand-in ``modules.devices``: everything on the CPU in float32 (like ``--use-cpu all --no-half``)."""
import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
device_interrogate = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
force_fp16 = False
gc_calls = 0


def get_device_for(task):
    return device


def torch_gc():
    global gc_calls
    gc_calls += 1


@contextlib.contextmanager
def autocast(disable=False):
    yield


@contextlib.contextmanager
def without_autocast(disable=False):
    yield


def cond_cast_unet(x):
    return x.to(dtype_unet) if unet_needs_upcast else x


def cond_cast_float(x):
    return x.float() if unet_needs_upcast else x


def test_for_nans(x, where):
    pass
