"""Hinton et al. (2015): (1-α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdsec.distill.base import LOSSES, DistillLoss


def hinton_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = F.cross_entropy(student_logits, targets)
    # T² keeps the soft-target gradients on the same scale as the hard-label ones.
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1),
                  log_target=True, reduction="batchmean") * temperature**2
    loss = (1.0 - alpha) * ce + alpha * kl
    return loss, {"ce": ce.detach(), "kd": kl.detach()}


@LOSSES.register("hinton_kd")
class HintonKD(DistillLoss):
    """Soft targets only: the teacher's logits at temperature T, mixed with the hard labels by α."""

    def __call__(self, student_logits, teacher_logits, targets, student_feature=None, teacher_target=None,
                 projector=None):
        loss, terms = hinton_terms(student_logits, teacher_logits, targets, self.config.temperature,
                                   self.config.alpha)
        return loss, {**terms, "loss": loss.detach()}
