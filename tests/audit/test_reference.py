import numpy as np
import pytest
import torch

from kdsec.audit.membership import score_attack
from kdsec.audit.reference import (AuditSamples, lira_scores, reference_masks, rmia_scores, signals,
                                   train_reference)
from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model, load_checkpoint
from kdsec.train import fit

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]})
TRAIN = TrainConfig(epochs=60, patience=60, lr=3e-3, batch_size=32)


@pytest.fixture(scope="module")
def references(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("references")
    x_population = np.concatenate([digits.x_val, digits.x_test])
    y_population = np.concatenate([digits.y_val, digits.y_test])
    masks = reference_masks(6, len(y_population), seed=0)
    models = [load_checkpoint(train_reference(SPEC, TRAIN, x_population, y_population, mask, seed,
                                              folder / f"ref{seed}.safetensors"))[0]
              for seed, mask in enumerate(masks)]
    return x_population, y_population, masks, models


def _attack(target, references, x_members, y_members, x_non, y_non):
    x_population, y_population, masks, models = references
    samples = AuditSamples(x_members, y_members, x_non, y_non, x_population, y_population)
    target_signals, reference_signals = signals(target, samples), signals(models, samples)
    return (score_attack(*rmia_scores(target_signals, reference_signals, masks), 0.01, "rmia", bootstrap=50),
            score_attack(*lira_scores(target_signals, reference_signals), 0.01, "lira"))


def test_reference_masks_are_half_each_and_deterministic():
    masks = reference_masks(8, 101, seed=3)
    assert (masks.sum(axis=1) == 50).all()
    assert (masks == reference_masks(8, 101, seed=3)).all()
    assert not (masks[0] == masks[1]).all()
    assert (reference_masks(4, 101, seed=3) == masks[:4]).all()  # row k does not depend on K


def test_reference_attacks_find_a_memorizing_model(digits, references):
    torch.manual_seed(0)
    members_x = digits.x_train[:60]
    members_y = np.random.default_rng(0).integers(0, 10, size=60)  # random labels: only memorization fits them
    target = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 256}))
    fit(target, members_x, members_y, members_x, members_y, TrainConfig(epochs=150, patience=150, lr=3e-3,
                                                                          batch_size=16))
    for result in _attack(target, references, members_x, members_y, digits.x_holdout[:60], digits.y_holdout[:60]):
        assert result.auc >= 0.9, result.attack
        assert result.tpr_at_low_fpr >= 0.3, result.attack


def test_reference_attacks_find_nothing_when_members_and_non_members_are_exchangeable(digits, references):
    """Neither 'members' nor non-members were trained on: the target learned from other data."""
    torch.manual_seed(1)
    target = build_model(SPEC)
    x_population, y_population, masks, _ = references
    fit(target, x_population[masks[0]], y_population[masks[0]], x_population[~masks[0]], y_population[~masks[0]],
        TRAIN)
    for result in _attack(target, references, digits.x_train[:360], digits.y_train[:360], digits.x_holdout,
                          digits.y_holdout):
        assert result.auc == pytest.approx(0.5, abs=0.05), result.attack
        assert result.tpr_at_low_fpr < 0.1, result.attack


def test_bootstrap_intervals_bracket_the_estimate():
    rng = np.random.default_rng(0)
    result = score_attack(rng.normal(0.5, 1, 300), rng.normal(0, 1, 300), 0.05, "known", bootstrap=200)
    assert result.auc_ci[0] < result.auc < result.auc_ci[1]
    assert result.auc_ci[1] - result.auc_ci[0] < 0.2
    assert 0.5 < result.balanced_accuracy < 1.0
