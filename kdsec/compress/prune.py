"""Global magnitude pruning with fine-tuning, made permanent."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.utils import prune


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of every Linear and Conv layer (biases are few and left dense)."""
    return [(module, "weight") for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def global_magnitude_prune(model: nn.Module, sparsity: float, finetune: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Zero the ``sparsity`` share of smallest-magnitude weights across all layers at once,
    fine-tune with the mask held fixed, then fold the mask into the weights.

    The result has plain ``weight`` tensors (no ``weight_orig``/``weight_mask``) with exactly
    ``round(sparsity × prunable weights)`` zeros that fine-tuning could not revive.
    """
    parameters = prunable_parameters(model)
    total = sum(module.weight.numel() for module, _ in parameters)
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=round(sparsity * total))
    if finetune is not None:
        finetune(model)
    for module, name in parameters:
        prune.remove(module, name)
    return model
