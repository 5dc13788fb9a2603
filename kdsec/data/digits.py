"""scikit-learn's digits: 1,797 real handwritten 8×8 digits that ship with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from kdsec.config import DataConfig
from kdsec.data.raw import DATASETS, RawDataset

DIGITS_MAX_PIXEL = 16.0


@DATASETS.register("digits")
def load(config: DataConfig) -> RawDataset:
    digits = load_digits()
    inputs = (digits.images.astype(np.float32) / DIGITS_MAX_PIXEL)[:, None, :, :]
    return RawDataset(
        inputs=inputs,
        labels=digits.target.astype(np.int64),
        class_names=[str(name) for name in digits.target_names],
        input_scale=1.0 / DIGITS_MAX_PIXEL,
    )
