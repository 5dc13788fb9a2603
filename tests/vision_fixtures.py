"""Small datasets written in the real on-disk formats, so the real loaders read them:
MNIST / Fashion-MNIST idx files, CIFAR-10 python pickle batches + meta, a class-per-folder tree.

Images are scikit-learn's real handwritten digits, upsampled (and tinted per class for CIFAR),
so models learn from them like from the real thing. The writers take how images are drawn
(``draw``): ``varied_digit_images`` makes full-size files (benchmarks/full_size.py) whose images
are not near-copies of one another.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

# How a writer draws its images: (count, size, seed) -> (uint8 N×size×size images, labels).
Draw = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]

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


def varied_digit_images(count: int, size: int, seed: int = 0, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Like ``digit_images``, but each image also gets a random position (digits drawn at 3/4 of
    ``size``, shifted by up to a quarter), a random contrast and stronger noise on its strokes, so
    that tens of thousands of draws from scikit-learn's 1,797 digits are not near-copies of each
    other: a learnable, synthetic stand-in for full-size MNIST / CIFAR-10 (``chunk`` at a time)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    drawn = -(-size * 3 // 4 // 8) * 8  # the digit's side, a multiple of its 8 pixels
    room = size - drawn + 1
    images = np.empty((count, size, size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        index = rng.integers(0, len(digits.target), stop - start)
        small = digits.images[index] / 16.0 * rng.uniform(0.55, 1.0, (stop - start, 1, 1))
        canvas = np.zeros((stop - start, size, size))
        big = np.kron(small, np.ones((drawn // 8, drawn // 8)))
        offsets = rng.integers(0, room, (stop - start, 2))
        for row, (dy, dx) in enumerate(offsets):
            canvas[row, dy:dy + drawn, dx:dx + drawn] = big[row]
        # Noise on the strokes only: the background stays 0, as in MNIST (and compresses alike).
        noise = rng.normal(0, 30, canvas.shape) * (canvas > 0)
        images[start:stop] = np.clip(canvas * 240 + noise, 0, 255).astype(np.uint8)
        labels[start:stop] = digits.target[index]
    return images, labels


def _idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.write_bytes(struct.pack(">II", magic, len(array))
                     + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"") + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 600, test: int = 200,
                draw: Draw = digit_images) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = draw(count, 28, seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), 2049)
    return root


def cifar_images(count: int, seed: int, draw: Draw = digit_images) -> tuple[np.ndarray, np.ndarray]:
    """N×32×32×3 uint8: a digit per class, tinted with a class colour."""
    gray, labels = draw(count, 32, seed)
    tint = np.random.default_rng(100).uniform(0.4, 1.0, size=(10, 3))
    return (gray[..., None] * tint[labels][:, None, None, :]).astype(np.uint8), labels


def write_cifar10(root: Path, per_batch: int = 120, test: int = 200,
                  draw: Draw = digit_images) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        images, labels = cifar_images(test if name == "test_batch" else per_batch, seed, draw)
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
