import math

import pytest
import torch

from kdsec.config import DistillConfig
from kdsec.distill import LOSSES


def test_hinton_kd_matches_a_hand_computed_value():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([0])
    config = DistillConfig(temperature=2.0, alpha=0.75)
    loss, terms = LOSSES.get("hinton_kd")(config)(student, teacher, target)

    ce = -math.log(math.e / (math.e + 1))
    p_s = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = 0.25 * ce + 0.75 * 4.0 * kl
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["kd"]) == pytest.approx(4.0 * kl, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_kd_term_vanishes_when_student_matches_teacher():
    logits = torch.randn(8, 10)
    _, terms = LOSSES.get("hinton_kd")(DistillConfig())(logits, logits.clone(), torch.zeros(8, dtype=torch.long))
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)


def test_distiller_freezes_the_teacher(digits):
    from kdsec.distill import OfflineDistiller
    from kdsec.models import ModelSpec, build_model

    teacher = build_model(ModelSpec("teacher_cnn", digits.input_shape, 10, {"channels": [4, 8], "fc": 16}))
    teacher.train()
    distiller = OfflineDistiller(teacher, digits.x_train, DistillConfig())
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert distiller.teacher_logits.shape == (len(digits.x_train), 10)


def test_offline_signals_round_trip_and_no_teacher_forward_while_training(digits, tmp_path):
    """Teacher logits are computed once, stored as safetensors and reused: training a student
    from the stored file never calls the teacher."""
    from kdsec.config import TrainConfig
    from kdsec.distill import OfflineDistiller
    from kdsec.models import ModelSpec, build_model
    from kdsec.train import accuracy, fit

    teacher = build_model(ModelSpec("teacher_cnn", digits.input_shape, 10, {"channels": [8, 16], "fc": 32}))
    fit(teacher, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=8, lr=3e-3))
    teacher_accuracy = accuracy(teacher, digits.x_test, digits.y_test)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    distiller = OfflineDistiller(teacher, digits.x_train, DistillConfig())
    forward_batches = len(calls)
    path = distiller.save(tmp_path / "signals.safetensors")
    reloaded = OfflineDistiller.load(path, DistillConfig(temperature=2.0))
    assert torch.equal(reloaded.teacher_logits, distiller.teacher_logits)

    student = build_model(ModelSpec("he_mlp", digits.input_shape, 10, {"hidden": [32]}))
    fit(student, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=15, lr=3e-3),
        reloaded.objective)
    assert len(calls) == forward_batches  # no teacher forward during student training
    assert accuracy(student, digits.x_test, digits.y_test) > teacher_accuracy - 0.05


def test_nan_loss_stops_training_with_one_line(digits):
    from kdsec.config import TrainConfig
    from kdsec.errors import TrainingError
    from kdsec.models import ModelSpec, build_model
    from kdsec.train import fit

    def poisoned(model, inputs, targets, batch):
        return model(inputs).sum() * float("nan"), {}

    model = build_model(ModelSpec("he_mlp", digits.input_shape, 10, {"hidden": [8]}))
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1; lower the learning rate") as info:
        fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=3), poisoned)
    assert "\n" not in str(info.value)


def test_fast_gradient_clipping_matches_torch():
    from kdsec.train import _clip_gradients

    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    second.load_state_dict(first.state_dict())
    inputs = torch.randn(8, 6) * 10
    for model in (first, second):
        model(inputs).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(first.parameters(), 0.5)
    _clip_gradients(list(second.parameters()), 0.5)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in second.parameters()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)
