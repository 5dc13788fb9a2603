"""The distillation-loss registry.

An entry is a ``DistillLoss`` subclass. Logit losses use only the teacher's stored logits;
feature losses also name a teacher and a student layer (``distill.teacher_layer`` /
``distill.student_layer``, or ``auto``), read through forward hooks. The teacher side of every
signal is computed once, offline, on the transfer set; the student side on every batch. A loss
may own a learned projection (e.g. FitNets' regressor) that is trained with the student and
then dropped: only the student ships.
"""

from __future__ import annotations

import torch
from torch import nn

from kdsec.config import DistillConfig
from kdsec.catalog import Catalog


class DistillLoss:
    """Base of every distillation loss. ``feature`` says which intermediate signal it needs:
    None (logits only), ``"spatial"`` (an N×C×H×W map) or ``"any"`` (a map or a vector)."""

    feature: str | None = None
    default_weight: float = 0.0  # weight of the feature term when distill.feature_weight is unset

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.weight = config.feature_weight if config.feature_weight is not None else self.default_weight

    def teacher_target(self, feature: torch.Tensor) -> torch.Tensor:
        """What is stored per transfer sample from the teacher's feature (computed once)."""
        return feature

    def projector(self, student_feature: torch.Tensor, teacher_target: torch.Tensor) -> nn.Module | None:
        """A learned map from the student's feature to the teacher's, where shapes differ."""
        return None

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 student_feature: torch.Tensor | None = None, teacher_target: torch.Tensor | None = None,
                 projector: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


LOSSES: Catalog[type[DistillLoss]] = Catalog("distillation loss", "distill.loss")
