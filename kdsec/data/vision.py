"""File-based image datasets through torchvision's own classes: MNIST, Fashion-MNIST, CIFAR-10
(official train + test files pooled, then split by kdsec's contract) and a user's class-per-folder
images. Everything is read from ``data.root``; nothing is downloaded unless ``data.download``.

Inputs are scaled to [0, 1] (N×C×H×W float32) like digits, so every stage (FGSM's clamp, the HE
engine, the served model's ``input_scale``) treats all datasets alike.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from kdsec.config import DataConfig
from kdsec.data.registry import DATASETS, RawDataset
from kdsec.errors import DataError

OBTAIN = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta: the 'CIFAR-10 python version')",
}


def _missing(config: DataConfig, detail: str) -> DataError:
    where = OBTAIN.get(config.name, "one sub-folder per class holding its images")
    return DataError(f"{config.name} not found under data.root='{config.root}' ({detail}); expected "
                     f"{config.root}/{where} — copy the files there, or set data.download: true on a machine "
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


def _torchvision(config: DataConfig, factory, channels_last: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    parts = []
    for train in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = factory(root=config.root, train=train, download=config.download)
        except RuntimeError as exc:  # torchvision: "Dataset not found ..." / "... or corrupted"
            if "not found" in str(exc).lower():
                raise _missing(config, str(exc).split(".")[0]) from None
            raise DataError(f"{config.name} under data.root='{config.root}' is corrupt ({exc})") from None
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, KeyError, IndexError) as exc:
            raise DataError(f"{config.name} under data.root='{config.root}' is corrupt or truncated "
                            f"({type(exc).__name__}: {exc})") from None
        data = np.asarray(dataset.data, dtype=np.uint8)
        targets = np.asarray(dataset.targets, dtype=np.int64)
        if len(data) != len(targets) or data.ndim != 4 - (not channels_last):
            raise DataError(f"{config.name} under data.root='{config.root}' is corrupt: {len(data)} images of "
                            f"shape {data.shape[1:]} for {len(targets)} labels")
        parts.append((data, targets, list(dataset.classes)))
    data = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts])
    data = data.transpose(0, 3, 1, 2) if channels_last else data[:, None]
    return data, labels, parts[0][2]


def _as_raw(data: np.ndarray, labels: np.ndarray, class_names: list[str], config: DataConfig) -> RawDataset:
    data, labels = _subsample(data, labels, config)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"{config.name} under data.root='{config.root}' is corrupt: labels outside "
                        f"0..{len(class_names) - 1}")
    return RawDataset(inputs=data.astype(np.float32) / 255.0, labels=labels.astype(np.int64),
                      class_names=[str(name) for name in class_names], input_scale=1.0 / 255.0)


@DATASETS.register("mnist")
def mnist(config: DataConfig) -> RawDataset:
    from torchvision.datasets import MNIST

    return _as_raw(*_torchvision(config, MNIST, channels_last=False), config)


@DATASETS.register("fashion_mnist")
def fashion_mnist(config: DataConfig) -> RawDataset:
    from torchvision.datasets import FashionMNIST

    return _as_raw(*_torchvision(config, FashionMNIST, channels_last=False), config)


# What an unverified CIFAR pickle may reference: numpy's array reconstruction and nothing else.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _vet_cifar_pickles(folder: Path) -> None:
    """With checksums off, CIFAR's pickled batches are not the official bytes: before torchvision
    unpickles them, prove each holds plain data only (no code can run from a crafted file)."""
    for path in sorted(folder.glob("*_batch*")) + [folder / "batches.meta"]:
        if path.is_file():
            try:
                _DataOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
            except Exception as exc:  # noqa: BLE001 — any failure means the file is not a plain batch
                raise DataError(f"cifar10 file '{path}' is corrupt or unsafe ({exc})") from None


@DATASETS.register("cifar10")
def cifar10(config: DataConfig) -> RawDataset:
    from torchvision.datasets import CIFAR10

    factory = CIFAR10
    if not config.verify_checksums:
        # The official md5 sums only match the official files; user-supplied copies (and test
        # fixtures in the same format) pass with the check off, after _vet_cifar_pickles.
        class UncheckedCIFAR10(CIFAR10):
            base_folder = CIFAR10.base_folder

            def _check_integrity(self) -> bool:
                return all((Path(self.root) / self.base_folder / name).is_file()
                           for name, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                path = Path(self.root) / self.base_folder / self.meta["filename"]
                if not path.is_file():
                    raise RuntimeError("Dataset metadata file not found")
                with path.open("rb") as handle:  # the data-only unpickler: no code can run from it
                    self.classes = _DataOnlyUnpickler(handle, encoding="latin1").load()[self.meta["key"]]
                self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

        folder = Path(config.root) / CIFAR10.base_folder
        if folder.is_dir():
            _vet_cifar_pickles(folder)
        factory = UncheckedCIFAR10
    return _as_raw(*_torchvision(config, factory, channels_last=True), config)


@DATASETS.register("imagefolder")
def imagefolder(config: DataConfig) -> RawDataset:
    """``data.root/<class>/<image>``: every image converted to ``data.channels`` and resized to
    ``data.image_size`` square."""
    from PIL import UnidentifiedImageError
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(config.root)
    if not root.is_dir():
        raise _missing(config, "no such folder")
    mode = "L" if config.channels == 1 else "RGB"
    transform = transforms.Compose([transforms.Resize((config.image_size, config.image_size)),
                                    transforms.PILToTensor()])
    try:
        dataset = ImageFolder(str(root))
    except FileNotFoundError as exc:
        raise _missing(config, str(exc)) from None
    if len(dataset.classes) < 2:
        raise DataError(f"imagefolder under data.root='{config.root}' has {len(dataset.classes)} class folder(s); "
                        "need at least 2")
    images, labels = [], []
    for path, label in dataset.samples:
        try:
            images.append(transform(_open(path, mode)).numpy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"image '{path}' is corrupt or not an image ({type(exc).__name__})") from None
        labels.append(label)
    return _as_raw(np.stack(images), np.asarray(labels, dtype=np.int64), dataset.classes, config)


def _open(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)
