import pytest
import torch
from torch.nn import functional as F

from kdsec.config import DistillConfig
from kdsec.distill import LOSSES
from kdsec.distill.attention import attention_map


def test_attention_map_is_the_normalized_channel_mean_of_squares():
    feature = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    energy = torch.tensor([[(1 + 9) / 2, (4 + 0) / 2]])
    assert torch.allclose(attention_map(feature), energy / energy.norm())


def test_attention_term_matches_hand_value_and_vanishes_on_the_teacher_map():
    config = DistillConfig(loss="attention", alpha=0.5, feature_weight=10.0)
    loss_fn = LOSSES.get("attention")(config)
    teacher_feature = torch.randn(4, 8, 4, 4)
    target = loss_fn.teacher_target(teacher_feature)
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    student_feature = torch.randn(4, 3, 8, 8)  # other width and size: pooled to 4×4, no projection
    loss, terms = loss_fn(logits, logits, labels, student_feature, target)
    expected_at = (attention_map(student_feature, (4, 4)) - target).pow(2).mean()
    assert float(terms["at"]) == pytest.approx(float(expected_at), rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(F.cross_entropy(logits, labels)) + 5.0 * float(expected_at),
                                        rel=1e-5)
    _, same = loss_fn(logits, logits, labels, teacher_feature * 3.0, target)  # scale-free map
    assert float(same["at"]) == pytest.approx(0.0, abs=1e-10)
    assert loss_fn.projector(student_feature, target) is None


def test_attention_needs_a_spatial_student(digits):
    from kdsec.distill.features import resolve_tap
    from kdsec.errors import ConfigError
    from kdsec.models import ModelSpec, build_model

    mlp = build_model(ModelSpec("he_mlp", digits.input_shape, 10, {"hidden": [8]}))
    with pytest.raises(ConfigError, match="needs spatial feature maps.*use fitnets or hinton_kd"):
        resolve_tap(mlp, "auto", "spatial", torch.as_tensor(digits.x_train[:2]), "student")
    cnn = build_model(ModelSpec("student_cnn", digits.input_shape, 10, {"channels": [4, 8], "fc": 16}))
    tap = resolve_tap(cnn, "auto", "spatial", torch.as_tensor(digits.x_train[:2]), "student")
    assert tap.module == "features.5"  # the deepest map larger than 1×1: 8×8 → 4×4 → 2×2 after the second pool
