"""The DP-SGD defense and the teacher-leakage measurement on real digits."""

from pathlib import Path

import numpy as np
import pytest
import torch

from kdsec import dp_sgd
from kdsec.audit import run as audit_run
from kdsec.config import DPConfig, TrainConfig, load_config
from kdsec.data import prepare_data
from kdsec.dp_sgd import NOISE_SOURCE, DPFit, fit_private
from kdsec.errors import ConfigError
from kdsec.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from kdsec.report import ReportContext, render_report
from kdsec.summary import read_summary
from kdsec.train import accuracy, fit

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]})


def test_dp_sgd_spends_at_most_the_target_epsilon_and_still_learns(digits, tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC)
    config = DPConfig(enabled=True, target_epsilon=4.0, epochs=15)
    result = fit_private(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val, config)
    assert 0.5 * config.target_epsilon < result.epsilon <= config.target_epsilon * 1.01
    assert result.noise_multiplier > 0.5 and result.steps > 0 and result.delta == config.delta
    assert accuracy(model, digits.x_test, digits.y_test) > 0.7
    # a plain module again: Opacus's hooks are gone, the weights save and reload as a normal checkpoint
    assert not any(module._forward_hooks for module in model.modules())
    reloaded, _ = load_checkpoint(save_checkpoint(model, SPEC, tmp_path / "dp.safetensors"))
    assert accuracy(reloaded, digits.x_test, digits.y_test) == accuracy(model, digits.x_test, digits.y_test)


def test_more_privacy_costs_more_noise(digits):
    noise = []
    for epsilon in (1.0, 8.0):
        torch.manual_seed(0)
        noise.append(fit_private(build_model(SPEC), digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                                 DPConfig(enabled=True, target_epsilon=epsilon, epochs=2)).noise_multiplier)
    assert noise[0] > 2 * noise[1]


def _dp_weights(digits, config: DPConfig) -> torch.Tensor:
    torch.manual_seed(0)  # the same initial weights every time: only DP-SGD's own randomness may differ
    model = build_model(SPEC)
    fit_private(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val, config)
    return torch.cat([tensor.flatten() for tensor in model.state_dict().values()])


def test_two_runs_of_the_same_config_draw_different_secret_noise(digits, monkeypatch):
    """The accountant's ε assumes noise (and Poisson batches) the adversary cannot replay from the
    logged seed: the same config and initial weights end in different weights; with the OS's
    randomness pinned the runs are identical, so that secret seed is the only difference."""
    config = DPConfig(enabled=True, target_epsilon=8.0, epochs=1)
    assert not torch.equal(_dp_weights(digits, config), _dp_weights(digits, config))
    monkeypatch.setattr(dp_sgd.os, "urandom", lambda size: bytes(size))
    assert torch.equal(_dp_weights(digits, config), _dp_weights(digits, config))


def test_the_report_says_where_the_dp_noise_comes_from(tmp_path):
    fixture = read_summary(Path(__file__).parents[1] / "report" / "fixtures" / "summary.json")
    fitted = DPFit(epsilon=7.9, delta=1e-5, noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.07, steps=42,
                   best_epoch=3, epochs_run=3, best_val_accuracy=0.9)
    defense = {"enabled": True, **fitted.as_dict(), "test_accuracy": 0.9, "baseline": "scratch_student",
               "baseline_test_accuracy": 0.95, "accuracy_change": -0.05, "membership_auc": 0.5,
               "baseline_membership_auc": 0.55, "membership_auc_change": -0.05, "membership_tpr_at_low_fpr": 0.01,
               "baseline_membership_tpr_at_low_fpr": 0.02, "attack": "rmia"}
    summary = fixture.model_copy(update={"privacy_defense": defense,
                                         "explanations": fixture.explanations.model_copy(update={"figure": None})})
    report = render_report(summary, tmp_path, ReportContext())
    for text in (report.markdown.read_text(), report.html.read_text()):
        assert f"Noise and batch sampling: {NOISE_SOURCE}." in text and "os.urandom" in NOISE_SOURCE


def test_transfer_set_needs_a_transfer_split():
    with pytest.raises(ConfigError, match="data.transfer_fraction"):
        load_config(None, ["distill.transfer_set=transfer"])


def test_teacher_leakage_is_measured_on_the_teachers_members_not_the_students(tmp_path):
    """A student that memorized only the transfer set: its own membership shows, the teacher's
    training members stay hidden (they are exchangeable with the holdout from its view)."""
    config = load_config(None, ["data.transfer_fraction=0.25", "distill.transfer_set=transfer",
                                "audit.reference_models=0", "audit.bootstrap=0", "audit.fgsm_epsilons=[0.0]"])
    bundle = prepare_data(config.data)
    torch.manual_seed(0)
    student = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 256}))
    labels = np.random.default_rng(0).integers(0, 10, size=len(bundle.y_transfer))  # memorization only
    fit(student, bundle.x_transfer, labels, bundle.x_transfer, labels,
        TrainConfig(epochs=120, patience=120, lr=3e-3, batch_size=32))
    relabelled = bundle.__class__(**{**bundle.__dict__, "y_transfer": labels})
    (audit,) = audit_run.audit_models({"kd_student": student}, relabelled, config, {})
    assert audit.member_split == "transfer"
    assert audit.membership.auc >= 0.9
    assert audit.teacher_leakage is not None
    assert audit.teacher_leakage.auc == pytest.approx(0.5, abs=0.06)
