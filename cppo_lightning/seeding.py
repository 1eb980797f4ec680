"""Seeds derived from a run's seed and a step's keys, and blocks run under them."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derived_seed", "seeded"]


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python runs."""
    words = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's RNG (CPU and the current CUDA device) seeded, then restore it."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
