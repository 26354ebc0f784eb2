"""The global random state is the host's: nothing ColorizeDiffusion does may move it.

Every random number the method needs comes from a generator seeded from the generation's seeds. The one place
the global state is still drawn from is module construction: ``torch.nn`` initialises new weights from it before
the checkpoint's weights replace them (the sketch encoder, OpenCLIP, the line extractors). A lazy first load would
then shift the webui's own later draws (e.g. its VAE posterior sample in img2img), so such loads run inside
:func:`untouched_global_rng`.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def untouched_global_rng() -> Iterator[None]:
    """Run a block, then restore the global random states it may have drawn from: torch's CPU generator, the
    current CUDA device's (when CUDA is initialised), numpy's and Python's."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
