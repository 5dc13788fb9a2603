"""The shared training loop on real digits: batch boundaries that BatchNorm models survive."""

import numpy as np
import pytest
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


def _trained_alone_and_together(digits, spec: ModelSpec, config: TrainConfig, seeds: list[int]):
    from kdsec.train import fit_ensemble, seed_everything

    rng = np.random.default_rng(0)
    halves = [np.sort(rng.choice(len(digits.y_train), 400, replace=False)) for _ in seeds]
    rests = [np.setdiff1d(np.arange(len(digits.y_train)), half)[:300] for half in halves]

    def fresh():
        models = []
        for seed in seeds:
            seed_everything(seed)
            models.append(build_model(spec))
        return models

    alone = fresh()
    results = [fit(model, digits.x_train[half], digits.y_train[half], digits.x_train[rest], digits.y_train[rest],
                   config, seed=seed) for model, half, rest, seed in zip(alone, halves, rests, seeds)]
    together = fresh()
    ensemble = fit_ensemble(together, np.stack([digits.x_train[h] for h in halves]),
                            np.stack([digits.y_train[h] for h in halves]),
                            np.stack([digits.x_train[r] for r in rests]), np.stack([digits.y_train[r] for r in rests]),
                            config, seeds)
    return alone, results, together, ensemble


@pytest.mark.parametrize("arch, options, augment", [("he_mlp", {"hidden": [16]}, "none"),
                                                     ("teacher_cnn", {"channels": [8, 8], "fc": 16}, "shift")])
def test_models_trained_together_equal_the_same_models_trained_alone(digits, arch, options, augment):
    """Same seeds → each model of the vectorized ensemble follows the same trajectory as ``fit``
    alone: own batches and augmentation, own Adam state, own gradient clipping (tight enough here
    to act), own early stopping (for he_mlp, patience 2 stops some models before others)."""
    spec = ModelSpec(arch, digits.input_shape, 10, options)
    config = TrainConfig(epochs=8, batch_size=32, lr=0.01, patience=2, grad_clip=0.5, augment=augment)
    alone, results, together, ensemble = _trained_alone_and_together(digits, spec, config, [3, 4, 5])
    assert [r.epochs_run for r in ensemble] == [r.epochs_run for r in results]
    if arch == "he_mlp":  # here patience 2 does stop the models at different epochs
        assert len({r.epochs_run for r in results}) > 1
    assert [r.best_epoch for r in ensemble] == [r.best_epoch for r in results]
    for mine, theirs in zip(together, alone):
        for (name, value), other in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(value, other, atol=2e-4, rtol=1e-3, msg=name)
    for mine, theirs in zip(ensemble, results):
        assert abs(mine.best_val_accuracy - theirs.best_val_accuracy) < 1e-6


def test_soft_target_ensemble_equals_fit_with_the_extraction_objective(digits):
    """The extraction attack's copies (one per defense, same queries, same init, different answers)
    train together on soft targets exactly as each would alone with its soft-label objective."""
    from kdsec.audit.extraction import soft_label_objective
    from kdsec.train import fit_ensemble, seed_everything

    spec = ModelSpec("he_mlp", digits.input_shape, 10, {"hidden": [16]})
    config = TrainConfig(epochs=6, batch_size=32, lr=0.01, patience=2, grad_clip=0.0)
    queries, rng = digits.x_val[:150], np.random.default_rng(1)
    answers = [rng.dirichlet(np.ones(10), size=len(queries)).astype(np.float32),
               np.eye(10, dtype=np.float32)[digits.y_val[:150]]]

    def fresh():
        seed_everything(7)
        return build_model(spec)

    alone = []
    for answer in answers:
        model = fresh()
        fit(model, queries, answer.argmax(1), queries, answer.argmax(1), config,
            soft_label_objective(torch.as_tensor(answer)), seed=7)
        alone.append(model)
    together = [fresh(), fresh()]
    hard = np.stack([answer.argmax(1) for answer in answers])
    fit_ensemble(together, np.stack([queries] * 2), hard, np.stack([queries] * 2), hard, config, [7, 7],
                 soft_targets=np.stack(answers))
    for mine, theirs in zip(together, alone):
        for value, other in zip(mine.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(value, other, atol=2e-4, rtol=1e-3)


def test_an_he_mlp_ensemble_takes_the_stacked_matrix_product_path():
    """The fast path for chains of Linear / x² layers is the one chosen for he_mlp (a silent fallback
    to vmap would still train correctly, only ~2× slower per step)."""
    from torch.func import stack_module_state

    from kdsec.train import _stacked_chain

    models = [build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16], "pool": 2})) for _ in range(3)]
    params, _ = stack_module_state(models)
    assert _stacked_chain(models[0], params) is not None
    teacher = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [4, 4], "fc": 8}))
    assert _stacked_chain(teacher, stack_module_state([teacher])[0]) is None
