"""Students. HE-friendly ones use only linear maps and polynomial activations (no ReLU, no
max-pool), so that the homomorphic engine can evaluate them on CKKS ciphertexts."""

from __future__ import annotations

import math

from torch import nn

from kdsec.models.registry import MODELS


class Square(nn.Module):
    """x², the cheapest activation under CKKS (one ciphertext multiplication)."""

    def forward(self, x):
        return x * x


@MODELS.register("he_mlp")
class HEMLP(nn.Module):
    """Flatten → [Linear → x²] × len(hidden) → Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (32,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            linear = nn.Linear(width, size)
            # x² grows fast; a smaller start keeps early activations (and gradients) bounded.
            nn.init.normal_(linear.weight, std=0.5 / math.sqrt(width))
            nn.init.zeros_(linear.bias)
            layers += [linear, Square()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
