import numpy as np
import pytest
import torch

from kdsec.audit.membership import loss_threshold_attack, score_attack
from kdsec.audit.trust import calibration, per_class
from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model
from kdsec.train import fit, predict_logits


def test_attack_finds_a_memorizing_model(digits):
    """Random labels can only be fitted by memorizing: the classic memorization setup."""
    torch.manual_seed(0)
    members_x = digits.x_train[:60]
    members_y = np.random.default_rng(0).integers(0, 10, size=60)
    model = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 256}))
    fit(model, members_x, members_y, members_x, members_y,
        TrainConfig(epochs=150, patience=150, lr=3e-3, batch_size=16))
    result = loss_threshold_attack(model, members_x, members_y, digits.x_holdout, digits.y_holdout, low_fpr=0.01)
    assert result.members == result.non_members == 60
    assert result.auc >= 0.9
    assert result.tpr_at_low_fpr >= 0.3


def test_attack_finds_nothing_when_members_and_non_members_are_exchangeable(digits):
    torch.manual_seed(0)
    untrained = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]}))
    result = loss_threshold_attack(untrained, digits.x_train, digits.y_train, digits.x_holdout, digits.y_holdout)
    assert result.auc == pytest.approx(0.5, abs=0.05)
    assert result.tpr_at_low_fpr < 0.1


def test_score_attack_on_known_scores():
    perfect = score_attack(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]), 0.01, "known")
    assert perfect.auc == 1.0 and perfect.tpr_at_low_fpr == 1.0
    inverted = score_attack(np.array([0.0, 1.0]), np.array([2.0, 3.0]), 0.01, "known")
    assert inverted.auc == 0.0 and inverted.tpr_at_low_fpr == 0.0


def test_calibration_of_a_perfect_and_an_overconfident_model():
    labels = np.arange(10).repeat(20)
    confident_right = np.eye(10)[labels] * 50
    assert calibration(confident_right, labels).ece == pytest.approx(0.0, abs=1e-6)
    confident_wrong = np.eye(10)[(labels + 1) % 10] * 50
    assert calibration(confident_wrong, labels).ece == pytest.approx(1.0, abs=1e-6)


def test_per_class_names_the_worst_class(digits):
    predictions = digits.y_test.copy()
    predictions[digits.y_test == 3] = 5
    result = per_class(predictions, digits.y_test, digits.class_names)
    assert result.worst_class == "3" and result.accuracy["3"] == 0.0
    assert result.worst_class_gap == pytest.approx((predictions == digits.y_test).mean())


def test_predict_logits_shape(digits):
    model = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [8]}))
    assert predict_logits(model, digits.x_test).shape == (len(digits.x_test), 10)
