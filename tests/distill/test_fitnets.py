import pytest
import torch
from torch.nn import functional as F

from kdsec.config import DistillConfig, TrainConfig
from kdsec.distill import LOSSES, OfflineDistiller
from kdsec.distill.fitnets import HintRegressor
from kdsec.models import ModelSpec, build_model


def test_hint_term_is_mse_through_the_regressor():
    config = DistillConfig(loss="fitnets", alpha=0.0, feature_weight=2.0)
    loss_fn = LOSSES.get("fitnets")(config)
    student_feature, teacher_target = torch.randn(5, 16), torch.randn(5, 64)
    regressor = loss_fn.projector(student_feature, teacher_target)
    assert isinstance(regressor.map, torch.nn.Linear) and regressor.map.weight.shape == (64, 16)
    logits, labels = torch.randn(5, 10), torch.randint(0, 10, (5,))
    loss, terms = loss_fn(logits, logits, labels, student_feature, teacher_target, regressor)
    with torch.no_grad():
        hint = F.mse_loss(regressor(student_feature), teacher_target)
    assert float(terms["hint"]) == pytest.approx(float(hint), rel=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, labels)) + 2.0 * float(hint), rel=1e-5)


def test_regressor_shapes():
    conv = HintRegressor(torch.randn(2, 8, 8, 8), torch.randn(2, 32, 4, 4))
    assert conv.spatial and conv(torch.randn(2, 8, 8, 8)).shape == (2, 32, 4, 4)
    pooled = HintRegressor(torch.randn(2, 8, 4, 4), torch.randn(2, 128))  # map facing a vector
    assert pooled(torch.randn(2, 8, 4, 4)).shape == (2, 128)


def test_fitnets_trains_the_regressor_with_the_student_and_pulls_the_hint_closer(digits):
    """Hooks on the named layers, a learned projection where widths differ (32 → 64), trained by
    fit alongside the student; the hint loss falls and the student still learns the task."""
    from kdsec.train import accuracy, fit

    teacher = build_model(ModelSpec("teacher_cnn", digits.input_shape, 10, {"channels": [8, 16], "fc": 64}))
    fit(teacher, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=8, lr=3e-3))
    teacher_accuracy = accuracy(teacher, digits.x_test, digits.y_test)
    distiller = OfflineDistiller(teacher, digits.x_train, DistillConfig(loss="fitnets"))
    assert distiller.signals["feature"].shape == (len(digits.x_train), 64)  # input of the last Linear
    student = build_model(ModelSpec("he_mlp", digits.input_shape, 10, {"hidden": [32]}))
    objective = distiller.objective
    result = fit(student, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                 TrainConfig(epochs=20, patience=20, lr=3e-3), objective)
    assert objective.tap.module == "layers.3" and objective.tap.read == "input"  # after x², before the head
    assert objective.projector.map.weight.shape == (64, 32)
    assert result.history[-1]["hint"] < 0.1 * result.history[0]["hint"]
    assert accuracy(student, digits.x_test, digits.y_test) > teacher_accuracy - 0.05


def test_named_layer_that_does_not_exist_is_a_config_error(digits):
    from kdsec.errors import ConfigError

    teacher = build_model(ModelSpec("teacher_cnn", digits.input_shape, 10, {"channels": [4, 8], "fc": 16}))
    with pytest.raises(ConfigError, match="distill.teacher_layer: the teacher has no module named 'nope'"):
        OfflineDistiller(teacher, digits.x_train[:8], DistillConfig(loss="fitnets", teacher_layer="nope"))
