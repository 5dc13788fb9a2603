"""Deterministic, stratified, fingerprinted splits of a dataset."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from kdsec.config import DataConfig
from kdsec.errors import ConfigError
from kdsec.data.raw import DATASETS
from kdsec.fileio import PRIVATE, write_atomic

SPLITS = ("train", "val", "test", "holdout", "transfer")


@dataclass(frozen=True)
class DataBundle:
    """The splits of one dataset. ``holdout`` never trains anything: it is the audit's non-members.
    ``transfer`` (optional) is only ever labelled by the teacher for distillation."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    x_transfer: np.ndarray  # distillation transfer set; empty unless data.transfer_fraction > 0
    y_transfer: np.ndarray
    class_names: list[str]
    input_scale: float
    fingerprint: str
    # Per-channel (mean, std) subtracted/divided after input_scale; None = inputs stay in [0, 1].
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def raw_rows(self, inputs: np.ndarray) -> np.ndarray:
        """Model inputs turned back into what a user sends a served model: one row of raw pixel
        values per sample (undoing the normalization and ``input_scale``)."""
        values = inputs.astype(np.float64)
        if self.normalization is not None:
            mean, std = (np.asarray(v, dtype=np.float64)[None, :, None, None] for v in self.normalization)
            values = values * std + mean
        return np.round(values / self.input_scale, 4).reshape(len(values), -1)

    def sizes(self) -> dict[str, int]:
        return {name: int(len(self.split(name)[1])) for name in SPLITS}

    def save(self, path: Path) -> Path:
        """Write the splits as a plain ``.npz`` (no pickle) so the data can be inspected later:
        owner-only (0600), since it says which rows were training members."""
        arrays = {f"{kind}_{name}": getattr(self, f"{kind}_{name}") for name in SPLITS for kind in "xy"}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return write_atomic(path, buffer.getvalue(), mode=PRIVATE)


def _fingerprint(inputs: np.ndarray, labels: np.ndarray, config: DataConfig) -> str:
    digest = hashlib.sha256()
    # The arrays' buffers themselves (the same bytes as .tobytes()), not a copy of all images.
    digest.update(np.ascontiguousarray(inputs))
    digest.update(np.ascontiguousarray(labels))
    split_spec = f"{config.name}|{config.seed}|{config.val_fraction}|{config.test_fraction}|{config.holdout_fraction}"
    if config.transfer_fraction:  # default splits keep the fingerprints they always had
        split_spec += f"|transfer={config.transfer_fraction}"
    if config.normalize != "none":
        split_spec += f"|normalize={config.normalize}|{list(config.mean)}|{list(config.std)}"
    digest.update(split_spec.encode())
    return digest.hexdigest()[:16]


def prepare_data(config: DataConfig) -> DataBundle:
    """Load ``config.name`` and split it stratified by class, reproducibly from ``config.seed``."""
    raw = DATASETS.get(config.name)(config)
    indices = np.arange(len(raw.labels))
    rest, test = train_test_split(
        indices, test_size=config.test_fraction, stratify=raw.labels, random_state=config.seed
    )
    holdout_share = config.holdout_fraction / (1.0 - config.test_fraction)
    rest, holdout = train_test_split(
        rest, test_size=holdout_share, stratify=raw.labels[rest], random_state=config.seed + 1
    )
    left = 1.0 - config.test_fraction - config.holdout_fraction
    transfer = np.array([], dtype=int)
    if config.transfer_fraction:
        rest, transfer = train_test_split(
            rest, test_size=config.transfer_fraction / left, stratify=raw.labels[rest], random_state=config.seed + 3
        )
        left -= config.transfer_fraction
    train, val = train_test_split(
        rest, test_size=config.val_fraction / left, stratify=raw.labels[rest], random_state=config.seed + 2
    )
    parts = {"train": train, "val": val, "test": test, "holdout": holdout, "transfer": transfer}
    return assemble(raw, parts, config, _fingerprint(raw.inputs, raw.labels, config))


def assemble(raw, parts: dict[str, np.ndarray], config: DataConfig, fingerprint: str) -> DataBundle:
    """The bundle of ``raw``'s rows ``parts`` (split name → row indices), normalized as ``config`` says."""
    parts = {"transfer": np.array([], dtype=int), **parts}
    arrays = {}
    for name, idx in parts.items():
        idx = np.sort(idx)
        arrays[f"x_{name}"] = raw.inputs[idx]
        arrays[f"y_{name}"] = raw.labels[idx]
    normalization = _normalization(arrays["x_train"], config)
    if normalization is not None:
        mean, std = (np.asarray(v, dtype=np.float32)[None, :, None, None] for v in normalization)
        for key, value in arrays.items():  # in place: each split is already a copy of its own
            if key.startswith("x_"):
                value -= mean
                value /= std
    return DataBundle(
        name=config.name,
        class_names=raw.class_names,
        input_scale=raw.input_scale,
        fingerprint=fingerprint,
        normalization=normalization,
        **arrays,
    )


def _normalization(x_train: np.ndarray, config: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if config.normalize == "none":
        return None
    channels = x_train.shape[1]
    if config.normalize == "given":
        if len(config.mean) != channels:
            raise ConfigError(f"data.mean/data.std have {len(config.mean)} values but {config.name} images have "
                              f"{channels} channel(s)")
        return tuple(map(float, config.mean)), tuple(map(float, config.std))
    mean = x_train.mean(axis=(0, 2, 3))
    std = np.maximum(x_train.std(axis=(0, 2, 3)), 1e-6)
    return tuple(map(float, mean)), tuple(map(float, std))
