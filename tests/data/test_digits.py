import json

import pytest
import torch

from kdsec.errors import ConfigError
import numpy as np

from kdsec.config import DataConfig
from kdsec.data import prepare_data


def test_splits_are_disjoint_complete_and_stratified(digits):
    sizes = digits.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["holdout"] > 300 and sizes["train"] > 800
    rows = {name: {row.tobytes() for row in digits.split(name)[0]} for name in sizes}
    # digits has a handful of duplicate images, so compare counts of distinct rows loosely
    assert len(rows["train"] & rows["holdout"]) <= 2
    assert sizes["transfer"] == 0 and digits.x_transfer.shape == (0, 1, 8, 8)  # off by default
    for name in (name for name in sizes if sizes[name]):
        counts = np.bincount(digits.split(name)[1], minlength=10) / sizes[name]
        assert np.all(np.abs(counts - 0.1) < 0.03)


def test_inputs_are_scaled_images(digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_train.dtype == np.float32
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.input_scale == 1 / 16


def test_fingerprint_is_deterministic_and_follows_the_seed(digits):
    again = prepare_data(DataConfig())
    assert again.fingerprint == digits.fingerprint
    assert np.array_equal(again.y_test, digits.y_test)
    other = prepare_data(DataConfig(seed=1))
    assert other.fingerprint != digits.fingerprint
    assert not np.array_equal(other.y_test, digits.y_test)


def test_bundle_saves_plain_npz(digits, tmp_path):
    path = digits.save(tmp_path / "splits.npz")
    with np.load(path, allow_pickle=False) as arrays:
        assert np.array_equal(arrays["y_holdout"], digits.y_holdout)


def test_transfer_split_is_separate_and_keeps_the_other_splits_apart(digits):
    bundle = prepare_data(DataConfig(transfer_fraction=0.25))
    sizes = bundle.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["transfer"] == round(0.25 * 1797) or abs(sizes["transfer"] - 0.25 * 1797) <= 1
    # test and holdout are drawn first, so they are the default ones; the transfer set comes out of training
    assert np.array_equal(bundle.y_test, digits.y_test) and np.array_equal(bundle.y_holdout, digits.y_holdout)
    assert sizes["train"] < digits.sizes()["train"]
    transfer = {row.tobytes() for row in bundle.x_transfer}
    assert len(transfer & {row.tobytes() for row in bundle.x_train}) <= 2
    assert len(transfer & {row.tobytes() for row in bundle.x_holdout}) <= 2
    assert bundle.fingerprint != digits.fingerprint


def test_dataset_normalization_is_per_channel_from_the_training_split_and_served_too(tmp_path):
    from kdsec.config import DataConfig
    from kdsec.data import prepare_data
    from kdsec.models import ModelSpec, build_model, save_checkpoint
    from kdsec.pyfunc_model import StudentModel

    plain, normalized = prepare_data(DataConfig()), prepare_data(DataConfig(normalize="dataset"))
    mean, std = normalized.normalization
    assert abs(float(normalized.x_train.mean())) < 1e-5 and abs(float(normalized.x_train.std()) - 1.0) < 1e-3
    assert mean[0] == pytest.approx(float(plain.x_train.mean()), rel=1e-5)
    assert np.allclose(normalized.x_test, (plain.x_test - mean[0]) / std[0], atol=1e-6)
    assert normalized.fingerprint != plain.fingerprint and plain.normalization is None

    given = prepare_data(DataConfig(normalize="given", mean=[0.5], std=[0.25]))
    assert np.allclose(given.x_val, (plain.x_val - 0.5) / 0.25)
    with pytest.raises(ConfigError, match="data.mean/data.std have 3 values but digits images have 1 channel"):
        prepare_data(DataConfig(normalize="given", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    with pytest.raises(ValueError, match="normalize: given needs data.mean and data.std"):
        DataConfig(normalize="given")

    # The served model takes raw 0-16 pixels and normalizes them as training did.
    spec = ModelSpec("he_mlp", normalized.input_shape, 10, {"hidden": [8]})
    model = build_model(spec)
    checkpoint = save_checkpoint(model, spec, tmp_path / "m.safetensors")
    serving = tmp_path / "serving.json"
    serving.write_text(json.dumps({"format": "float", "input_scale": normalized.input_scale,
                                   "normalization": normalized.normalization, "class_names": normalized.class_names}))
    served = StudentModel()
    served.load_context(type("Context", (), {"artifacts": {"checkpoint": str(checkpoint), "serving": str(serving)}})())
    raw = np.rint(plain.x_test[:20] / plain.input_scale).reshape(20, -1)
    with torch.no_grad():
        expected = model(torch.as_tensor(normalized.x_test[:20])).argmax(1).numpy()
    assert np.array_equal(served.predict(None, raw), expected)
