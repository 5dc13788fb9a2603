"""Device selection: cuda when present, CPU everywhere else."""

from __future__ import annotations

import torch


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
