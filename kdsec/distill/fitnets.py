"""FitNets hints (Romero et al., 2015), trained jointly with Hinton KD: β · MSE(r(f_s), f_t)
between the teacher's hint layer and a learned regressor r of the student's guided layer.

r is a 1×1 convolution between feature maps (followed by average pooling to the teacher's size
when spatial sizes differ) or a linear map between vectors; a map facing a vector is pooled to a
vector first. r is trained with the student and discarded afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdsec.distill.kd import hinton_terms
from kdsec.distill.base import LOSSES, DistillLoss


class HintRegressor(nn.Module):
    def __init__(self, student_feature: torch.Tensor, teacher_target: torch.Tensor) -> None:
        super().__init__()
        self.spatial = student_feature.dim() == 4 and teacher_target.dim() == 4
        if self.spatial:
            self.map = nn.Conv2d(student_feature.shape[1], teacher_target.shape[1], 1, bias=False)
            self.size = tuple(teacher_target.shape[-2:])
        else:
            self.map = nn.Linear(_vector(student_feature).shape[1], _vector(teacher_target).shape[1])

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            mapped = self.map(feature)
            return mapped if tuple(mapped.shape[-2:]) == self.size else F.adaptive_avg_pool2d(mapped, self.size)
        return self.map(_vector(feature))


def _vector(feature: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×C (global average), N×D unchanged."""
    return feature.mean((2, 3)) if feature.dim() == 4 else feature.flatten(1)


@LOSSES.register("fitnets")
class FitNetsHint(DistillLoss):
    feature = "any"
    # β of the hint term. RepDistiller uses 100 on conv hints; our default hint is the penultimate
    # (post-ReLU, unnormalized) vector, whose MSE is larger, and β=1 kept it from swamping KD on digits.
    default_weight = 1.0

    def projector(self, student_feature, teacher_target):
        return HintRegressor(student_feature, teacher_target)

    def __call__(self, student_logits, teacher_logits, targets, student_feature=None, teacher_target=None,
                 projector=None):
        loss, terms = hinton_terms(student_logits, teacher_logits, targets, self.config.temperature,
                                   self.config.alpha)
        mapped = projector(student_feature)
        reference = teacher_target if projector.spatial else _vector(teacher_target)
        hint = F.mse_loss(mapped, reference.to(mapped.dtype))
        total = loss + self.weight * hint
        return total, {**terms, "hint": hint.detach(), "loss": total.detach()}
