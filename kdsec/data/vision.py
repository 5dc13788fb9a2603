"""File-based image datasets: MNIST, Fashion-MNIST (torchvision's readers), CIFAR-10 (official
train + test files pooled, then split by kdsec's contract; read by kdsec itself) and a user's
class-per-folder images. Everything is read from ``data.root``; nothing is downloaded unless
``data.download``.

Inputs are scaled to [0, 1] (N×C×H×W float32) like digits, so every stage (FGSM's clamp, the HE
engine, the served model's ``input_scale``) treats all datasets alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np

from kdsec.config import DataConfig
from kdsec.data.raw import DATASETS, RawDataset
from kdsec.errors import DataError
from kdsec.fileio import read_bounded

OBTAIN = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta: the 'CIFAR-10 python version')",
}

_ENV_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def dataset_root(config: DataConfig) -> Path:
    """``data.root`` as the absolute folder it names: ``$VAR`` / ``${VAR}`` and ``~`` expanded, then
    resolved. Every file-based loader calls this once, first, and checks and reads only the result,
    so no library can read a different folder than the one kdsec checked."""

    def value(match: re.Match[str]) -> str:
        name = match["bare"] or match["braced"]
        if name not in os.environ:
            raise DataError(f"data.root='{config.root}' uses ${name}, but environment variable '{name}' is not "
                            "set; set it or write the folder out")
        return os.environ[name]

    try:
        return Path(_ENV_VARIABLE.sub(value, config.root)).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # an unknown ~user or home, a symlink loop
        raise DataError(f"data.root='{config.root}' cannot be resolved ({exc}); write the folder out") from None


def _where(config: DataConfig, root: Path) -> str:
    """What the user wrote and, where it differs, the folder it resolved to."""
    return f"data.root='{config.root}'" + ("" if config.root == str(root) else f" (= {root})")


# Where the official files can be had without internet access (gzipped idx files: gunzip them
# into the folder the error names). The MNIST fetcher sits beside a kdsec checkout in CI and here.
FETCH = {
    "mnist": "python3 ../shared/data/fetch_mnist.py {root} (where that script is at hand)",
    "fashion_mnist": "the Debian package dataset-fashion-mnist (dpkg -L dataset-fashion-mnist lists its files)",
}


def _missing(config: DataConfig, root: Path, detail: str) -> DataError:
    where = OBTAIN.get(config.name, "one sub-folder per class holding its images")
    fetch = f", get them with {FETCH[config.name].format(root=root)}" if config.name in FETCH else ""
    return DataError(f"{config.name} not found under {_where(config, root)} ({detail}); expected "
                     f"{root}/{where} — copy the files there{fetch}, or set data.download: true on a machine "
                     "with internet access")


def _subsample(inputs: np.ndarray, labels: np.ndarray, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded subset of ``data.max_samples`` examples (0 = all)."""
    if not config.max_samples or config.max_samples >= len(labels):
        return inputs, labels
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=config.max_samples, stratify=labels,
                               random_state=config.seed)
    keep = np.sort(keep)
    return inputs[keep], labels[keep]


def _torchvision(config: DataConfig, root: Path, factory) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An MNIST-like dataset (idx files, no pickle): train and test pooled, N×1×H×W."""
    parts = []
    for train in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = factory(root=str(root), train=train, download=config.download)
        except RuntimeError as exc:  # torchvision: "Dataset not found ..." / "... or corrupted"
            if "not found" in str(exc).lower():
                raise _missing(config, root, str(exc).split(".")[0]) from None
            raise DataError(f"{config.name} under {_where(config, root)} is corrupt ({exc})") from None
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, KeyError, IndexError) as exc:
            raise DataError(f"{config.name} under {_where(config, root)} is corrupt or truncated "
                            f"({type(exc).__name__}: {exc})") from None
        data = np.asarray(dataset.data, dtype=np.uint8)
        targets = np.asarray(dataset.targets, dtype=np.int64)
        if len(data) != len(targets) or data.ndim != 3:
            raise DataError(f"{config.name} under {_where(config, root)} is corrupt: {len(data)} images of "
                            f"shape {data.shape[1:]} for {len(targets)} labels")
        parts.append((data, targets, list(dataset.classes)))
    data = np.concatenate([part[0] for part in parts])[:, None]
    labels = np.concatenate([part[1] for part in parts])
    return data, labels, parts[0][2]


def _as_raw(data: np.ndarray, labels: np.ndarray, class_names: list[str], config: DataConfig,
            root: Path) -> RawDataset:
    data, labels = _subsample(data, labels, config)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"{config.name} under {_where(config, root)} is corrupt: labels outside "
                        f"0..{len(class_names) - 1}")
    inputs = data.astype(np.float32)
    inputs /= 255.0  # in place: one float copy of the images at a time (70,000 MNIST images: 220 MB)
    return RawDataset(inputs=inputs, labels=labels.astype(np.int64),
                      class_names=[str(name) for name in class_names], input_scale=1.0 / 255.0)


@DATASETS.register("mnist")
def mnist(config: DataConfig) -> RawDataset:
    from torchvision.datasets import MNIST

    root = dataset_root(config)
    return _as_raw(*_torchvision(config, root, MNIST), config, root)


@DATASETS.register("fashion_mnist")
def fashion_mnist(config: DataConfig) -> RawDataset:
    from torchvision.datasets import FashionMNIST

    root = dataset_root(config)
    return _as_raw(*_torchvision(config, root, FashionMNIST), config, root)


# What a CIFAR pickle may reference: numpy's array reconstruction (protocols 2-4, and 5's
# _frombuffer) and nothing else, so no code can run from a crafted file.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
# An official batch is ~30 MiB; the cap keeps a planted huge file from exhausting memory.
_CIFAR_MAX_FILE_BYTES = 200 * 2**20
_CIFAR_ROW = 3 * 32 * 32


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _read_cifar_file(path: Path, md5: str, config: DataConfig, root: Path) -> dict:
    """Read ``path`` once, check the md5 of exactly those bytes (unless data.verify_checksums is off)
    and unpickle the same bytes data-only: nothing can swap the file between check and load."""
    # One bounded read of a regular file (not a link, FIFO or folder), its size checked before reading.
    content = read_bounded(path, _CIFAR_MAX_FILE_BYTES, "cifar10 file", error=DataError)
    if config.verify_checksums and hashlib.md5(content, usedforsecurity=False).hexdigest() != md5:
        raise DataError(f"cifar10 file '{path}' does not match the official CIFAR-10 checksum: it is modified or "
                        "corrupt; use the official files (delete the folder and set data.download: true), or set "
                        "data.verify_checksums: false for your own copy in the same format")
    try:
        entry = _DataOnlyUnpickler(io.BytesIO(content), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 — any failure means the file is not a plain batch
        raise DataError(f"cifar10 file '{path}' is corrupt or unsafe ({exc})") from None
    if not isinstance(entry, dict):
        raise DataError(f"cifar10 file '{path}' is corrupt: holds a {type(entry).__name__}, not a dict")
    return entry


def _cifar_batch(path: Path, md5: str, config: DataConfig, root: Path) -> tuple[np.ndarray, list[int]]:
    """The N×3072 uint8 rows and N labels of one batch file."""
    entry = _read_cifar_file(path, md5, config, root)
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == _CIFAR_ROW):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"cifar10 file '{path}' is corrupt: 'data' is a {found}, not N×{_CIFAR_ROW} uint8")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(label, int) for label in labels)):
        raise DataError(f"cifar10 file '{path}' is corrupt: 'labels' is not a list of {len(data)} integers")
    return data, labels


@DATASETS.register("cifar10")
def cifar10(config: DataConfig) -> RawDataset:
    """The CIFAR-10 python version, read by kdsec: torchvision's class only names the files and
    their md5 sums and downloads the archive, because its own reader ``pickle.load``s the batches."""
    from torchvision.datasets import CIFAR10

    root = dataset_root(config)
    folder = root / CIFAR10.base_folder
    batches = CIFAR10.train_list + CIFAR10.test_list
    names = [name for name, _ in batches] + [CIFAR10.meta["filename"]]
    # Only missing files trigger a download: a modified one is reported below, never silently replaced.
    if config.download and not all((folder / name).exists() for name in names):
        from torchvision.datasets.utils import download_and_extract_archive

        try:  # the archive's md5 is checked before it is unpacked
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cifar10 download into {_where(config, root)} failed ({exc}); copy the files there "
                            "instead") from None
    if not folder.is_dir():
        raise _missing(config, root, f"no folder {CIFAR10.base_folder}")
    absent = [name for name in names if not (folder / name).exists()]
    if absent:  # named all at once, before any file is read or checked
        raise _missing(config, root, f"no file {', '.join(absent)} in {CIFAR10.base_folder}")
    meta = _read_cifar_file(folder / CIFAR10.meta["filename"], CIFAR10.meta["md5"], config, root)
    classes = meta.get(CIFAR10.meta["key"])
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)):
        raise DataError(f"cifar10 file '{folder / CIFAR10.meta['filename']}' is corrupt: "
                        f"'{CIFAR10.meta['key']}' is not a list of class names")
    rows, labels = [], []
    for name, md5 in batches:  # train batches, then the test batch: pooled like before
        data, batch_labels = _cifar_batch(folder / name, md5, config, root)
        rows.append(data)
        labels.extend(batch_labels)
    # torchvision's HWC images are reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) of these rows;
    # kdsec wants N×C×H×W, which is the reshape alone.
    images = np.concatenate(rows).reshape(-1, 3, 32, 32)
    return _as_raw(images, np.asarray(labels, dtype=np.int64), classes, config, root)


@DATASETS.register("imagefolder")
def imagefolder(config: DataConfig) -> RawDataset:
    """``data.root/<class>/<image>``: every image converted to ``data.channels`` and resized to
    ``data.image_size`` square."""
    from PIL import UnidentifiedImageError
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = dataset_root(config)
    if not root.is_dir():
        raise _missing(config, root, "no such folder")
    mode = "L" if config.channels == 1 else "RGB"
    transform = transforms.Compose([transforms.Resize((config.image_size, config.image_size)),
                                    transforms.PILToTensor()])
    try:
        dataset = ImageFolder(str(root))
    except FileNotFoundError as exc:
        raise _missing(config, root, str(exc)) from None
    if len(dataset.classes) < 2:
        raise DataError(f"imagefolder under {_where(config, root)} has {len(dataset.classes)} class folder(s); "
                        "need at least 2")
    images, labels = [], []
    for path, label in dataset.samples:
        try:
            images.append(transform(_open(path, mode)).numpy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"image '{path}' is corrupt or not an image ({type(exc).__name__})") from None
        labels.append(label)
    return _as_raw(np.stack(images), np.asarray(labels, dtype=np.int64), dataset.classes, config, root)


def _open(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)
