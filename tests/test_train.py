"""The shared training loop on real digits: batch boundaries that BatchNorm models survive."""

import torch

from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model
from kdsec.train import _batch_bounds, accuracy, fit


def test_a_trailing_one_sample_batch_is_folded_into_the_previous_one():
    assert _batch_bounds(897, 32) == [*((s, s + 32) for s in range(0, 864, 32)), (864, 897)]
    assert _batch_bounds(896, 32)[-1] == (864, 896) and len(_batch_bounds(896, 32)) == 28
    assert _batch_bounds(65, 64) == [(0, 65)]
    assert _batch_bounds(1, 64) == [(0, 1)]
    assert _batch_bounds(70, 64) == [(0, 64), (64, 70)]


def test_batchnorm_resnet_trains_when_the_split_leaves_one_sample_over(digits):
    assert len(digits.y_train) % 32 == 1  # 897 training digits: the case that used to crash BatchNorm
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", digits.input_shape, 10, {"width": 8}))
    result = fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                 TrainConfig(epochs=3, batch_size=32, patience=3))
    assert result.epochs_run == 3
    assert accuracy(model, digits.x_test, digits.y_test) > 0.5
