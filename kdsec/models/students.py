"""Students. HE-friendly ones use only linear maps and polynomial activations (no ReLU, no
max-pool), so that the homomorphic engine can evaluate them on CKKS ciphertexts."""

from __future__ import annotations

import math

from torch import nn

from kdsec.errors import ConfigError
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
        self.layers = _x2_head(layers, math.prod(input_shape), hidden, num_classes)

    def forward(self, x):
        return self.layers(x)


def _x2_head(layers: list[nn.Module], width: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """``layers`` (ending in a Flatten of ``width`` values) → [Linear → x²] × len(hidden) → Linear,
    as one flat chain: the form the HE compiler lowers."""
    for size in hidden:
        layers += [_small(nn.Linear(width, size), width), Square()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def _small(layer: nn.Linear | nn.Conv2d, fan_in: int) -> nn.Linear | nn.Conv2d:
    """x² grows fast; a smaller start keeps early activations (and gradients) bounded."""
    nn.init.normal_(layer.weight, std=0.5 / math.sqrt(fan_in))
    nn.init.zeros_(layer.bias)
    return layer


@MODELS.register("he_cnn")
class HECNN(nn.Module):
    """[AvgPool(pool) →] [Conv → [BatchNorm] → [AvgPool(conv_pool)] → x²] × len(channels) → Flatten →
    [Linear → x²] × len(hidden) → Linear.

    Every layer but x² is affine, so the HE engine composes each run of them into one Linear map
    (a convolution becomes a sparse matrix, BatchNorm is folded in). The defaults are CryptoNets'
    layout: on 28×28 inputs, 5 maps of 13×13 (845) → 100 → classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (5,),
                 kernel: int = 5, stride: int = 2, padding: int = 1, conv_pool: int = 1,
                 hidden: list[int] = (100,), batchnorm: bool = False, pool: int = 1) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        in_channels, height, width_px = input_shape
        layers: list[nn.Module] = []
        if pool > 1:
            layers.append(nn.AvgPool2d(pool))
            height, width_px = height // pool, width_px // pool
        for index, out_channels in enumerate(channels):
            layers.append(_small(nn.Conv2d(in_channels, out_channels, kernel, stride, padding),
                                 in_channels * kernel * kernel))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            height, width_px = ((size + 2 * padding - kernel) // stride + 1 for size in (height, width_px))
            if conv_pool > 1:
                layers.append(nn.AvgPool2d(conv_pool))
                height, width_px = height // conv_pool, width_px // conv_pool
            if height < 1 or width_px < 1:
                raise ConfigError(f"he_cnn: the {input_shape[1]}×{input_shape[2]} input shrinks to nothing at "
                                  f"conv layer {index + 1}; lower kernel, stride, conv_pool or pool, or use fewer "
                                  "channels")
            layers.append(Square())
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.layers = _x2_head(layers, in_channels * height * width_px, hidden, num_classes)

    def forward(self, x):
        return self.layers(x)
