"""The one-run DP audit (Steinke, Nasr & Jagielski 2023) on real digits: the bound itself, its
power on a model trained without DP, and a DP-SGD model whose claim it cannot refute — while a
claim the training does not keep is refuted and fails the dp_audit gate."""

from __future__ import annotations

import math

import pytest
import torch

from kdsec.audit.dp_audit import audit_one_run, epsilon_lower_bound, make_canaries, p_value
from kdsec.config import DPConfig, TrainConfig, load_config
from kdsec.dp_sgd import fit_private
from kdsec.gates import Gate, Metric, evaluate_gates, gate_metrics
from kdsec.models import ModelSpec, build_model
from kdsec.train import fit

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [64]})


def test_the_bound_is_the_papers():
    # every guess right, pure DP: P[Binomial(r, q) = r] = q^r = 5 % gives ε = log(q / (1 − q))
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(200, 100, 100, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # chance-level guessing refutes nothing; more right guesses, a larger bound; δ only lowers it
    assert epsilon_lower_bound(256, 128, 64, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(256, 128, v, 1e-5) for v in (80, 100, 120, 128)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(256, 128, 120, 1e-3) < epsilon_lower_bound(256, 128, 120, 0.0)
    # the δ term is 2mδ times the largest per-step mass ratio (the paper's code): p-values in [0, 1]
    assert 0 < p_value(256, 128, 120, 1.0, 1e-5) < p_value(256, 128, 120, 2.0, 1e-5) <= 1  # grows with ε
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 20, 5, 0.0)


@pytest.fixture(scope="module")
def canaries(digits):
    return make_canaries(digits.x_test, digits.y_test, 256, 10, seed=0)


def test_the_canaries_are_wrong_labels_on_images_no_model_trains_on(digits, canaries):
    assert len(canaries.labels) == 256 and 90 < canaries.included.sum() < 166
    truth = {image.tobytes(): label for image, label in zip(digits.x_test, digits.y_test)}
    assert all(truth[image.tobytes()] != label for image, label in zip(canaries.inputs, canaries.labels))
    train = {image.tobytes() for image in digits.x_train}
    assert not any(image.tobytes() in train for image in canaries.inputs)


def _plain(digits, epochs=60):
    def train(x, y):
        torch.manual_seed(0)
        model = build_model(SPEC)
        fit(model, x, y, digits.x_val, digits.y_val, TrainConfig(epochs=epochs, patience=epochs, lr=3e-3))
        return None, model
    return train


def test_without_dp_the_audit_has_power_and_dp_sgd_keeps_its_claim(digits, canaries):
    plain, _ = audit_one_run("non_dp", _plain(digits), digits.x_train, digits.y_train, canaries, 1e-5)
    print(f"non-DP: {plain.correct}/{plain.guesses} right, ε̂ {plain.epsilon_lower:.2f}")
    assert plain.epsilon_lower >= 2.0 and not plain.refuted  # no claim to refute

    def private(x, y):
        torch.manual_seed(0)
        model = build_model(SPEC)
        # ε = 2: below the ceiling of 128 guesses (ε̂ ≤ 3.74 even if all are right), so the audit can refute it
        fitted = fit_private(model, x, y, digits.x_val, digits.y_val, DPConfig(enabled=True, target_epsilon=2.0,
                                                                              epochs=30))
        return fitted.epsilon, model

    dp, _ = audit_one_run("dp", private, digits.x_train, digits.y_train, canaries, 1e-5)
    print(f"DP-SGD (accountant ε {dp.accountant_epsilon:.2f}): {dp.correct}/{dp.guesses} right, "
          f"ε̂ {dp.epsilon_lower:.2f}")
    assert dp.epsilon_lower <= dp.accountant_epsilon and not dp.refuted
    assert dp.ceiling == pytest.approx(3.736, abs=1e-3) and dp.conclusive and dp.claim == "holds"
    config = load_config(None, [])
    metrics = gate_metrics(1.0, 1.0, _Audit(), _HE(), _AtRest(), dp_audits=[dp, plain])
    assert metrics[Metric.DP_AUDIT_HOLDS] == 1.0

    # A claim the training does not keep: the same plain training said to be ε = 0.5: refuted.
    def claims_too_much(x, y):
        return 0.5, _plain(digits)(x, y)[1]

    lying, _ = audit_one_run("dp", claims_too_much, digits.x_train, digits.y_train, canaries, 1e-5)
    assert lying.refuted and lying.epsilon_lower > 0.5
    verdicts = {v.name: v for v in evaluate_gates(gate_metrics(1.0, 1.0, _Audit(), _HE(), _AtRest(),
                                                               dp_audits=[lying]), config.gates)}
    assert not verdicts[Gate.DP_AUDIT].passed
    # a claim no outcome of 128 guesses could refute (ε = 8 over the 3.74 ceiling): inconclusive, skipped
    from dataclasses import replace

    loose = replace(dp, accountant_epsilon=8.0)
    assert loose.claim == "inconclusive" and not loose.conclusive
    verdicts = {v.name: v for v in evaluate_gates(gate_metrics(1.0, 1.0, _Audit(), _HE(), _AtRest(),
                                                               dp_audits=[loose, plain]), config.gates)}
    assert verdicts[Gate.DP_AUDIT].checks[0].level == "skipped"
    # no DP run: the gate has nothing to check and is skipped, not failed
    verdicts = {v.name: v for v in evaluate_gates(gate_metrics(1.0, 1.0, _Audit(), _HE(), _AtRest()), config.gates)}
    assert verdicts[Gate.DP_AUDIT].passed and verdicts[Gate.DP_AUDIT].checks[0].level == "skipped"


class _Attack:
    auc, tpr_at_low_fpr = 0.5, 0.0


class _Audit:
    attacks = {"loss": _Attack()}

    class calibration:
        ece = 0.01


class _HE:
    enabled = False


class _AtRest:
    def __getattr__(self, name):
        return True
