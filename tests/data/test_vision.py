"""torchvision's real loaders, offline, on fixtures written in the real on-disk formats."""

import pickle

import numpy as np
import pytest

from kdsec.config import DataConfig
from kdsec.data import prepare_data
from kdsec.errors import DataError
from tests.vision_fixtures import write_cifar10, write_imagefolder, write_mnist


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_load_and_split_like_digits(tmp_path, name, folder):
    write_mnist(tmp_path, folder, train=300, test=100)
    bundle = prepare_data(DataConfig(name=name, root=str(tmp_path)))
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert sum(bundle.sizes().values()) == 400
    assert bundle.x_train.dtype == np.float32 and 0.0 <= bundle.x_train.min() and bundle.x_train.max() <= 1.0
    assert bundle.input_scale == 1 / 255
    assert prepare_data(DataConfig(name=name, root=str(tmp_path))).fingerprint == bundle.fingerprint


def test_cifar10_pickled_batches_load_with_checksums_off(tmp_path):
    write_cifar10(tmp_path, per_batch=40, test=60)
    bundle = prepare_data(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False))
    assert bundle.input_shape == (3, 32, 32) and sum(bundle.sizes().values()) == 260
    assert bundle.class_names[:2] == ["airplane", "automobile"]
    # the official md5 sums do not match a fixture: with verification on, it is "corrupt", on one line
    with pytest.raises(DataError, match="corrupt"):
        prepare_data(DataConfig(name="cifar10", root=str(tmp_path)))


def test_max_samples_takes_a_stratified_subset(tmp_path):
    write_cifar10(tmp_path, per_batch=40, test=60)
    bundle = prepare_data(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False, max_samples=150))
    assert sum(bundle.sizes().values()) == 150


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    write_cifar10(tmp_path, per_batch=40, test=60)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": Exploit()}))
    with pytest.raises(DataError, match="unsafe"):
        prepare_data(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False))


def test_imagefolder_reads_class_folders(tmp_path):
    write_imagefolder(tmp_path / "pets")
    bundle = prepare_data(DataConfig(name="imagefolder", root=str(tmp_path / "pets"), image_size=16,
                                     test_fraction=0.25, holdout_fraction=0.25))
    assert bundle.class_names == ["cat", "dog", "fox"] and bundle.input_shape == (3, 16, 16)
    assert sum(bundle.sizes().values()) == 120
    gray = prepare_data(DataConfig(name="imagefolder", root=str(tmp_path / "pets"), channels=1, image_size=8,
                                   test_fraction=0.25, holdout_fraction=0.25))
    assert gray.input_shape == (1, 8, 8)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "imagefolder"])
def test_missing_data_is_one_line_naming_data_root(tmp_path, name):
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    message = str(error.value)
    assert "\n" not in message and "data.root" in message and str(tmp_path / "nowhere") in message


def test_truncated_idx_file_is_corrupt(tmp_path):
    write_mnist(tmp_path, train=100, test=50)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt"):
        prepare_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_a_broken_image_is_named(tmp_path):
    write_imagefolder(tmp_path / "pets", per_class=10)
    (tmp_path / "pets" / "dog" / "000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="000.png"):
        prepare_data(DataConfig(name="imagefolder", root=str(tmp_path / "pets")))
