"""Small datasets written in the real on-disk formats, so the real loaders read them:
MNIST / Fashion-MNIST idx files, CIFAR-10 python pickle batches + meta, a class-per-folder tree.

Images are scikit-learn's real handwritten digits, upsampled (and tinted per class for CIFAR),
so models learn from them like from the real thing.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def digit_images(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uint8 images (N×size×size) of real digits, and their labels."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    index = rng.choice(len(digits.target), size=count, replace=count > len(digits.target))
    small = digits.images[index] / 16.0
    repeat = -(-size // 8)
    big = np.kron(small, np.ones((repeat, repeat)))[:, :size, :size]
    noisy = np.clip(big * 230 + rng.normal(0, 12, big.shape), 0, 255)
    return noisy.astype(np.uint8), digits.target[index].astype(np.int64)


def _idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.write_bytes(struct.pack(">II", magic, len(array))
                     + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"") + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 600, test: int = 200) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = digit_images(count, 28, seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), 2049)
    return root


def cifar_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N×32×32×3 uint8: a digit per class, tinted with a class colour."""
    gray, labels = digit_images(count, 32, seed)
    tint = np.random.default_rng(100).uniform(0.4, 1.0, size=(10, 3))
    return (gray[..., None] * tint[labels][:, None, None, :]).astype(np.uint8), labels


def write_cifar10(root: Path, per_batch: int = 120, test: int = 200) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        images, labels = cifar_images(test if name == "test_batch" else per_batch, seed)
        batch = {"batch_label": name, "labels": labels.tolist(),
                 "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch,
                                                        "num_vis": 3072}))
    return root


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 40,
                      size: int = 20) -> Path:
    images, labels = digit_images(per_class * len(classes) * 4, size, seed=3)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        chosen = images[labels == index][:per_class]
        for number, image in enumerate(chosen):
            Image.fromarray(image).convert("RGB").save(folder / f"{number:03d}.png")
    return root
