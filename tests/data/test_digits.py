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
