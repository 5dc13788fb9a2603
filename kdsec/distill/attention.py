"""Attention transfer (Zagoruyko & Komodakis, 2017): Hinton KD plus β/2 · ‖Q_s − Q_t‖² between
the normalized spatial attention maps Q = vec(mean_c f²) / ‖·‖₂ of a student and a teacher layer.

The maps are channel-free, so teacher and student may have any widths; where their spatial sizes
differ the student's map is average-pooled to the teacher's. No learned projection is needed.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdsec.distill.kd import hinton_terms
from kdsec.distill.base import LOSSES, DistillLoss


def attention_map(feature: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """N×C×H×W → N×(H·W): mean over channels of the squared activations, L2-normalized."""
    energy = feature.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(energy.shape[-2:]) != tuple(size):
        energy = F.adaptive_avg_pool2d(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


@LOSSES.register("attention")
class AttentionTransfer(DistillLoss):
    feature = "spatial"
    default_weight = 1000.0  # β of the paper (and of RepDistiller) for the mean-squared form

    def teacher_target(self, feature):
        return attention_map(feature)

    def __call__(self, student_logits, teacher_logits, targets, student_feature=None, teacher_target=None,
                 projector=None):
        loss, terms = hinton_terms(student_logits, teacher_logits, targets, self.config.temperature,
                                   self.config.alpha)
        side = round(teacher_target.shape[1] ** 0.5)
        at = (attention_map(student_feature, (side, side)) - teacher_target).pow(2).mean()
        total = loss + self.weight / 2 * at
        return total, {**terms, "at": at.detach(), "loss": total.detach()}
