"""The dataset registry: a loader turns a DataConfig into raw arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kdsec.config import DataConfig
from kdsec.catalog import Catalog


@dataclass(frozen=True)
class RawDataset:
    """All labelled examples of a dataset, already scaled to model input (float32, N×C×H×W)."""

    inputs: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    # How to turn what a user sends to a served model into ``inputs`` (see kdsec.pyfunc_model).
    input_scale: float


DATASETS: Catalog[Callable[[DataConfig], RawDataset]] = Catalog("dataset", "data.name")


# One sample's shape (C, H, W) and the class count of the datasets whose format fixes them, known
# before any file is read (preflight checks the student's HE layouts on them). imagefolder's
# classes are its folders: not known until it is read.
DECLARED_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10)}
