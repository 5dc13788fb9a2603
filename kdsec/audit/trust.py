"""Calibration (expected calibration error, reliability diagram) and per-class behaviour."""

from __future__ import annotations

import warnings
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


@dataclass(frozen=True)
class TemperatureScaling:
    temperature: float  # fitted on the validation split by minimizing NLL
    ece_before: float
    ece_after: float
    after: Calibration


def temperature_scaling(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                        test_labels: np.ndarray) -> TemperatureScaling:
    """Fit one temperature T on validation logits (Guo et al. 2017), report test ECE before/after."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        scaled = log_softmax(val_logits.astype(np.float64) / np.exp(log_t), axis=1)
        return float(-scaled[np.arange(len(val_labels)), val_labels].mean())

    temperature = float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))
    after = calibration(test_logits / temperature, test_labels)
    return TemperatureScaling(temperature, calibration(test_logits, test_labels).ece, after.ece, after)


@dataclass(frozen=True)
class Robustness:
    epsilons: list[float]
    accuracy: list[float]  # accuracy on FGSM examples at each epsilon (epsilon 0 = clean)
    source: str  # "white-box", or the surrogate the examples were crafted on (transfer)


FGSM_CHUNK = 2048  # images attacked at once (their input gradients are the memory that counts)


def fgsm_robustness(model, inputs: np.ndarray, labels: np.ndarray, epsilons: list[float],
                    surrogate=None, surrogate_name: str = "surrogate") -> Robustness:
    """Accuracy under the fast gradient sign method on inputs scaled to [0, 1]. A model without
    gradients (e.g. dynamically quantized int8) is attacked with examples crafted on
    ``surrogate`` (its float source), which is a transfer attack and says so."""
    import torch
    from torch.nn import functional as F

    model, source, correct = model.cpu().eval(), "white-box", np.zeros(len(epsilons))
    for start in range(0, len(inputs), FGSM_CHUNK):  # in chunks: one batch's gradients in memory, not the split's
        x = torch.as_tensor(inputs[start:start + FGSM_CHUNK], dtype=torch.float32).requires_grad_(True)
        y = torch.as_tensor(labels[start:start + FGSM_CHUNK])
        if source == "white-box":
            loss = F.cross_entropy(model(x), y)
            if loss.requires_grad:
                with warnings.catch_warnings():  # quantized ops warn that they have no gradient
                    warnings.simplefilter("ignore")
                    loss.backward()
            if x.grad is None or not x.grad.any():
                if surrogate is None:
                    raise ValueError("the model has no input gradients (e.g. int8); pass its float source as surrogate")
                source, x.grad = f"transfer from {surrogate_name}", None
        if source != "white-box":
            F.cross_entropy(surrogate.cpu().eval()(x), y).backward()
        direction = x.grad.sign()
        with torch.no_grad():
            for index, epsilon in enumerate(epsilons):
                adversarial = (x + epsilon * direction).clamp(0.0, 1.0)
                correct[index] += float((model(adversarial).argmax(1) == y).sum())
    accuracy = [float(count / max(len(inputs), 1)) for count in correct]
    return Robustness(list(epsilons), accuracy, source)
