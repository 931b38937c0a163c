"""Seeded work that leaves the caller's random number generators as they were."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators (the CPU's and, once CUDA is
    initialised, the current CUDA device's) for the ``with`` block, and restore their states after it.

    timm and the PETL modules draw their initial values, and dropout / drop-path their
    masks, from the global generators: seeding them makes a stage reproducible, and
    restoring them keeps a library call from reseeding its caller's generators.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # Only an initialised CUDA device is seeded (and restored): seeding one that is not
    # would queue a reseed for its first use, after this block.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
