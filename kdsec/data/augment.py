"""Batch augmentations on tensors (N×C×H×W), chosen by name in ``train.augment``."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_crop(inputs: torch.Tensor, generator: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset per sample (a random shift)."""
    count, _, height, width = inputs.shape
    padded = F.pad(inputs, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(inputs.device)
    dx = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(inputs.device)
    rows = (dy[:, None] + torch.arange(height, device=inputs.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=inputs.device))[:, None, :]
    samples = torch.arange(count, device=inputs.device)[:, None, None]
    return padded[samples, :, rows, cols].permute(0, 3, 1, 2)


def random_crop_flip(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, as for CIFAR) and a horizontal flip of half the samples."""
    cropped = random_crop(inputs, generator, pad=4)
    flip = (torch.rand(len(inputs), generator=generator) < 0.5).to(inputs.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


AUGMENTATIONS = {
    "none": lambda inputs, generator: inputs,
    "shift": random_crop,
    "crop_flip": random_crop_flip,
}
