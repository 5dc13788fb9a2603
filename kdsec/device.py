"""Device selection: cuda when present, CPU everywhere else; and where a model lives."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are; CPU for a model without any (e.g. an int8 program)."""
    return next(model.parameters(), torch.empty(0)).device


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``count`` (≥ 1) for the block, then restored. Models this
    small train fastest one thread each, several at once: two 2-thread trainings on 2 cores
    oversubscribe them (16 reference models: 13.6 s at 2 threads each, 5.9 s at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parallel_share(workers: int) -> int:
    """Torch threads for each of ``workers`` trainings run at once on this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
