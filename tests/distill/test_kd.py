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
    loss, terms = LOSSES.get("hinton_kd")(student, teacher, target, config)

    ce = -math.log(math.e / (math.e + 1))
    p_s = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = 0.25 * ce + 0.75 * 4.0 * kl
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
    assert terms["kd"] == pytest.approx(4.0 * kl, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_kd_term_vanishes_when_student_matches_teacher():
    logits = torch.randn(8, 10)
    _, terms = LOSSES.get("hinton_kd")(logits, logits.clone(), torch.zeros(8, dtype=torch.long), DistillConfig())
    assert terms["kd"] == pytest.approx(0.0, abs=1e-6)


def test_distiller_freezes_the_teacher(digits):
    from kdsec.distill import OfflineDistiller
    from kdsec.models import ModelSpec, build_model

    teacher = build_model(ModelSpec("teacher_cnn", digits.input_shape, 10, {"channels": [4, 8], "fc": 16}))
    teacher.train()
    distiller = OfflineDistiller(teacher, digits.x_train, DistillConfig())
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert distiller.teacher_logits.shape == (len(digits.x_train), 10)
