"""Offline distillation: the teacher's logits are computed once, then every student epoch reuses them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdsec.config import DistillConfig
from kdsec.distill.registry import LOSSES
from kdsec.train import predict_logits


class OfflineDistiller:
    """Owns the teacher/student semantics: the teacher is frozen in eval mode, runs once on the
    transfer set, and never receives gradients; ``objective`` plugs into ``kdsec.train.fit``."""

    def __init__(self, teacher: nn.Module, transfer_inputs: np.ndarray, config: DistillConfig) -> None:
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.config = config
        self.loss = LOSSES.get(config.loss)
        self.teacher_logits = torch.as_tensor(predict_logits(teacher, transfer_inputs))

    def objective(self, student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  batch_indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher_logits = self.teacher_logits.to(inputs.device)[batch_indices]
        return self.loss(student(inputs), teacher_logits, targets, self.config)
