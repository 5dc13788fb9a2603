"""Membership inference: does the model treat its training samples differently from unseen ones?

The loss-threshold attack (Yeom et al. 2018) scores each sample by its negative loss: training
members tend to have lower loss. Members are drawn from the training set to match the number of
non-members (the audit holdout, never trained on), so AUC 0.5 means no measurable leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

from kdsec.train import predict_logits


@dataclass(frozen=True)
class MembershipResult:
    attack: str
    auc: float
    tpr_at_low_fpr: float
    low_fpr: float
    members: int
    non_members: int
    roc_fpr: list[float] = field(repr=False)
    roc_tpr: list[float] = field(repr=False)


def per_sample_loss(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(predict_logits(model, inputs))
    return F.cross_entropy(logits, torch.as_tensor(labels), reduction="none").numpy()


def score_attack(member_scores: np.ndarray, non_member_scores: np.ndarray, low_fpr: float,
                 attack: str) -> MembershipResult:
    """AUC and TPR at ``low_fpr`` of a score where higher means 'member'."""
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr, _ = roc_curve(truth, scores)
    # Thin the curve for plotting; the metrics use the full one.
    keep = np.unique(np.r_[0, np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int)])
    return MembershipResult(
        attack=attack,
        auc=float(roc_auc_score(truth, scores)),
        tpr_at_low_fpr=float(tpr[fpr <= low_fpr].max()),
        low_fpr=low_fpr,
        members=len(member_scores),
        non_members=len(non_member_scores),
        roc_fpr=fpr[keep].tolist(),
        roc_tpr=tpr[keep].tolist(),
    )


def loss_threshold_attack(model: nn.Module, x_members: np.ndarray, y_members: np.ndarray,
                          x_non_members: np.ndarray, y_non_members: np.ndarray, low_fpr: float = 0.01,
                          seed: int = 0) -> MembershipResult:
    """Run the attack with as many members as non-members (drawn reproducibly from ``seed``)."""
    count = min(len(y_members), len(y_non_members))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(y_members), size=count, replace=False))
    non_chosen = np.sort(rng.choice(len(y_non_members), size=count, replace=False))
    member_loss = per_sample_loss(model, x_members[chosen], y_members[chosen])
    non_member_loss = per_sample_loss(model, x_non_members[non_chosen], y_non_members[non_chosen])
    return score_attack(-member_loss, -non_member_loss, low_fpr, attack="loss_threshold")
