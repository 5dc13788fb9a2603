"""The distillation-loss registry.

A loss takes (student logits, teacher logits, targets, DistillConfig) and returns the total loss
and its named terms, so that every term is logged by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdsec.config import DistillConfig
from kdsec.registry_util import Registry

DistillLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DistillConfig],
                       tuple[torch.Tensor, dict[str, float]]]

LOSSES: Registry[DistillLoss] = Registry("distillation loss", "distill.loss")
