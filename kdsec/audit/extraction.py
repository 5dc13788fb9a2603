"""Model extraction (knockoff-style, Orekondy et al. 2019): an attacker queries the deployed
model's prediction interface and trains a copy on the answers.

Reported per defense of the interface — full probabilities, probabilities rounded to
``decimals``, top-1 label only: the stolen copy's accuracy and its fidelity (agreement with the
victim) on data neither side queried.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import softmax
from torch.nn import functional as F

from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model
from kdsec.train import can_fit_together, fit, fit_ensemble, predict_logits, seed_everything

DEFENSES = ("probabilities", "rounded", "top1")


@dataclass(frozen=True)
class ExtractionResult:
    defense: str
    queries: int
    query_source: str
    stolen_accuracy: float
    fidelity: float  # fraction of evaluation samples where the copy predicts what the victim predicts


def _answers(victim, queries: np.ndarray, defense: str, decimals: int) -> np.ndarray:
    probabilities = softmax(predict_logits(victim.cpu(), queries).astype(np.float64), axis=1)
    if defense == "rounded":
        probabilities = np.round(probabilities, decimals)
        probabilities /= np.maximum(probabilities.sum(1, keepdims=True), 1e-12)
    elif defense == "top1":
        probabilities = np.eye(probabilities.shape[1])[probabilities.argmax(1)]
    return probabilities.astype(np.float32)


def soft_label_objective(targets: torch.Tensor):
    """Cross-entropy against the victim's answers (soft or one-hot), aligned by batch index."""
    def objective(model, inputs, _labels, index):
        loss = -(targets[index] * F.log_softmax(model(inputs), dim=1)).sum(1).mean()
        return loss, {"extraction_loss": loss.detach()}
    return objective


def extraction_attack(victim, queries: np.ndarray, query_source: str, x_eval: np.ndarray, y_eval: np.ndarray,
                      copy_spec: ModelSpec, train: TrainConfig, decimals: int = 1, seed: int = 0,
                      defenses: tuple[str, ...] = DEFENSES) -> list[ExtractionResult]:
    """One knockoff copy per defense, each trained on the victim's answers to the same queries
    (soft-label cross-entropy) from the same initialization; the copies train together
    (``fit_ensemble``) where the architecture allows."""
    victim_predictions = predict_logits(victim.cpu(), x_eval).argmax(1)
    answers = [_answers(victim, queries, defense, decimals) for defense in defenses]
    copies = []
    for _ in defenses:
        seed_everything(seed)
        copies.append(build_model(copy_spec))
    # The attacker has no labelled validation data: it stops on its own query answers.
    if len(copies) > 1 and can_fit_together(copies[0], train):
        hard = np.stack([answer.argmax(1) for answer in answers])
        stacked = np.stack([queries] * len(copies))
        fit_ensemble(copies, stacked, hard, stacked, hard, train, [seed] * len(copies), label="extraction",
                     soft_targets=np.stack(answers))
    else:
        for copy, answer, defense in zip(copies, answers, defenses):
            seed_everything(seed)  # each copy's training sees the same global RNG (dropout), as before
            fit(copy, queries, answer.argmax(1), queries, answer.argmax(1), train,
                soft_label_objective(torch.as_tensor(answer)), seed=seed, label=f"extraction-{defense}")
    results = []
    for copy, defense in zip(copies, defenses):
        predictions = predict_logits(copy, x_eval).argmax(1)
        results.append(ExtractionResult(defense, len(queries), query_source,
                                        float((predictions == y_eval).mean()),
                                        float((predictions == victim_predictions).mean())))
    return results
