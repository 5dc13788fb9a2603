"""Membership inference: does the model treat its training samples differently from unseen ones?

The loss-threshold attack (Yeom et al. 2018) scores each sample by its negative loss: training
members tend to have lower loss. Members are drawn from the training set to match the number of
non-members (the audit holdout, never trained on), so AUC 0.5 means no measurable leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
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
    tpr_at_0_1_fpr: float = float("nan")  # TPR at 0.1% FPR
    balanced_accuracy: float = float("nan")  # best (TPR + TNR) / 2 over thresholds
    auc_ci: tuple[float, float] = (float("nan"), float("nan"))  # bootstrap 95% interval
    tpr_at_low_fpr_ci: tuple[float, float] = (float("nan"), float("nan"))
    per_class_auc: dict[str, float] = field(default_factory=dict)


def per_sample_loss(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(predict_logits(model, inputs))
    return F.cross_entropy(logits, torch.as_tensor(labels), reduction="none").numpy()


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    return float(tpr[fpr <= at].max())


def roc(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) exactly as ``sklearn.metrics.roc_curve`` computes them (thresholds at distinct
    scores, collinear points dropped), without its input validation, which cost ~1 ms a call: the
    bootstrap makes thousands of calls per audit."""
    order = np.argsort(scores, kind="stable")[::-1]
    ordered = scores[order]
    thresholds = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]
    tps = np.cumsum(truth[order], dtype=np.float64)[thresholds]
    fps = 1 + thresholds - tps
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under an ROC curve from ``roc`` (trapezoids, as ``sklearn.metrics.auc``)."""
    return float(np.trapezoid(tpr, fpr))


def score_attack(member_scores: np.ndarray, non_member_scores: np.ndarray, low_fpr: float, attack: str,
                 bootstrap: int = 0, seed: int = 0, member_labels: np.ndarray | None = None,
                 non_member_labels: np.ndarray | None = None,
                 class_names: list[str] | None = None) -> MembershipResult:
    """AUC, TPR at ``low_fpr`` and 0.1% FPR, balanced accuracy of a score where higher means
    'member'; with ``bootstrap`` > 0, 95% intervals from resampling members and non-members;
    with labels, the AUC of each class."""
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr = roc(truth, scores)
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(bootstrap):
        members = rng.choice(member_scores, len(member_scores))
        non_members = rng.choice(non_member_scores, len(non_member_scores))
        boot_fpr, boot_tpr = roc(truth, np.r_[members, non_members])
        aucs.append(auc(boot_fpr, boot_tpr))
        tprs.append(_tpr_at(boot_fpr, boot_tpr, low_fpr))
    per_class = {}
    if member_labels is not None and class_names is not None:
        for index, name in enumerate(class_names):
            member_mask, non_member_mask = member_labels == index, non_member_labels == index
            if member_mask.any() and non_member_mask.any():
                per_class[name] = auc(*roc(np.r_[np.ones(member_mask.sum()), np.zeros(non_member_mask.sum())],
                                           np.r_[member_scores[member_mask], non_member_scores[non_member_mask]]))
    # Thin the curve for plotting; the metrics use the full one.
    keep = np.unique(np.r_[0, np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int)])
    interval = (lambda values: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
                if values else (float("nan"), float("nan")))
    return MembershipResult(
        attack=attack,
        auc=auc(fpr, tpr),
        tpr_at_low_fpr=_tpr_at(fpr, tpr, low_fpr),
        low_fpr=low_fpr,
        members=len(member_scores),
        non_members=len(non_member_scores),
        roc_fpr=fpr[keep].tolist(),
        roc_tpr=tpr[keep].tolist(),
        tpr_at_0_1_fpr=_tpr_at(fpr, tpr, 0.001),
        balanced_accuracy=float(((tpr + 1 - fpr) / 2).max()),
        auc_ci=interval(aucs),
        tpr_at_low_fpr_ci=interval(tprs),
        per_class_auc=per_class,
    )
