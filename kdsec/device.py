"""Device selection: cuda when present, CPU everywhere else; and where a model lives."""

from __future__ import annotations

import torch
from torch import nn


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are; CPU for a model without any (e.g. an int8 program)."""
    return next(model.parameters(), torch.empty(0)).device
