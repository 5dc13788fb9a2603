"""Calibration (expected calibration error, reliability diagram) and per-class behaviour."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax


@dataclass(frozen=True)
class Calibration:
    ece: float
    bin_confidence: list[float]
    bin_accuracy: list[float]
    bin_count: list[int]


def calibration(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> Calibration:
    """ECE: the count-weighted mean |accuracy − confidence| over equal-width confidence bins."""
    probabilities = softmax(logits.astype(np.float64), axis=1)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    bin_confidence, bin_accuracy, bin_count = [], [], []
    ece = 0.0
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        bin_count.append(count)
        if count == 0:
            bin_confidence.append(float("nan"))
            bin_accuracy.append(float("nan"))
            continue
        mean_confidence, mean_accuracy = float(confidence[members].mean()), float(correct[members].mean())
        bin_confidence.append(mean_confidence)
        bin_accuracy.append(mean_accuracy)
        ece += count / len(labels) * abs(mean_accuracy - mean_confidence)
    return Calibration(ece=float(ece), bin_confidence=bin_confidence, bin_accuracy=bin_accuracy, bin_count=bin_count)


@dataclass(frozen=True)
class PerClass:
    accuracy: dict[str, float]
    worst_class: str
    worst_class_gap: float  # overall accuracy − worst class accuracy


def per_class(predictions: np.ndarray, labels: np.ndarray, class_names: list[str]) -> PerClass:
    scores = {name: float((predictions[labels == index] == index).mean())
              for index, name in enumerate(class_names) if (labels == index).any()}
    worst = min(scores, key=scores.get)
    return PerClass(accuracy=scores, worst_class=worst,
                    worst_class_gap=float((predictions == labels).mean() - scores[worst]))
