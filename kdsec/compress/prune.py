"""Global magnitude pruning with an iterative schedule and fine-tuning, made permanent."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.utils import prune


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of every Linear and Conv layer (biases are few and left dense)."""
    return [(module, "weight") for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """Zhu & Gupta's (2017) cubic schedule: s_k = s·(1 − (1 − k/n)³), k = 1..n — big cuts first,
    while there is redundancy, small ones near the target."""
    return [target * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]


def global_magnitude_prune(model: nn.Module, sparsity: float, finetune: Callable[[nn.Module], object] | None = None,
                           steps: int = 1) -> nn.Module:
    """Zero the ``sparsity`` share of smallest-magnitude weights across all layers, in ``steps``
    rounds of (prune to the schedule's level → fine-tune with the masks held fixed), then fold
    the masks into the weights.

    The result has plain ``weight`` tensors (no ``weight_orig``/``weight_mask``) with exactly
    ``round(sparsity × prunable weights)`` zeros that fine-tuning could not revive.
    """
    parameters = prunable_parameters(model)
    total = sum(module.weight.numel() for module, _ in parameters)
    pruned = 0
    for level in sparsity_schedule(sparsity, steps):
        # Repeated pruning stacks masks; the amount counts among the weights still alive.
        amount = round(level * total) - pruned
        prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=amount)
        pruned += amount
        if finetune is not None:
            finetune(model)
    for module, name in parameters:
        prune.remove(module, name)
    return model
