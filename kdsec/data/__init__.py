"""Datasets by name, split deterministically into train / val / test / audit-holdout."""

from kdsec.data.bundle import DataBundle, prepare_data
from kdsec.data.raw import DATASETS, DECLARED_SHAPES, RawDataset

# Importing the loaders registers them.
from kdsec.data import digits, vision  # noqa: F401  isort:skip

__all__ = ["DATASETS", "DECLARED_SHAPES", "DataBundle", "RawDataset", "prepare_data"]
