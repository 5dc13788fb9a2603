"""What rebuilds a model (its architecture spec) and what it costs (parameters, FLOPs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from kdsec.device import device_of


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        return cls(arch=raw["arch"], input_shape=tuple(raw["input_shape"]), num_classes=raw["num_classes"],
                   options=raw.get("options", {}))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int((parameter != 0).sum())
    return total, nonzero


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Dense floating-point operations (2 per multiply-accumulate) of one forward pass of one sample
    through every Linear and Conv layer, quantized ones included; zeros are not skipped, so only
    structured pruning (smaller layers) lowers it."""
    import torch

    total = 0

    def linear_hook(module, inputs, output):
        nonlocal total
        in_features = inputs[0].shape[-1]
        total += 2 * in_features * output.shape[-1] * (output.numel() // output.shape[-1]) // len(output)

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += 2 * kernel * output[0].numel()

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Linear" and hasattr(module, "_packed_params"):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=device_of(model)))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return int(total)


def has_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a convolution."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())
