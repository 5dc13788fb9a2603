"""Students. HE-friendly ones use only linear maps and polynomial activations (no ReLU, no
max-pool), so that the homomorphic engine can evaluate them on CKKS ciphertexts."""

from __future__ import annotations

import math

from torch import nn

from kdsec.models.catalog import MODELS


class Square(nn.Module):
    """x², the cheapest activation under CKKS (one ciphertext multiplication)."""

    def forward(self, x):
        return x * x


@MODELS.register("he_mlp")
class HEMLP(nn.Module):
    """[AvgPool(pool) →] Flatten → [Linear → x²] × len(hidden) → Linear.

    Average pooling is linear, so the HE engine folds it into the first Linear layer; it makes
    large inputs (e.g. 32×32×3) affordable for the plaintext model at no HE depth."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (32,),
                 pool: int = 1) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        if pool > 1:
            channels, height, width_px = input_shape
            layers.append(nn.AvgPool2d(pool))
            input_shape = (channels, height // pool, width_px // pool)
        layers.append(nn.Flatten())
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
