"""Hinton et al. (2015): (1-α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdsec.config import DistillConfig
from kdsec.distill.registry import LOSSES


@LOSSES.register("hinton_kd")
def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              config: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    temperature, alpha = config.temperature, config.alpha
    ce = F.cross_entropy(student_logits, targets)
    # T² keeps the soft-target gradients on the same scale as the hard-label ones.
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1),
                  log_target=True, reduction="batchmean") * temperature**2
    loss = (1.0 - alpha) * ce + alpha * kl
    return loss, {"ce": float(ce.detach()), "kd": float(kl.detach()), "loss": float(loss.detach())}
