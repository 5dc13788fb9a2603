"""The file-based loaders, offline, on fixtures written in the real on-disk formats, and how
data.root is read (~, $VARS, relative)."""

import pickle

import numpy as np
import pytest

from kdsec.config import DataConfig
from kdsec.data import prepare_data
from kdsec.data.vision import dataset_root
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
    # the official md5 sums do not match a fixture: with verification on, it is "modified", on one line
    with pytest.raises(DataError, match="official CIFAR-10 checksum: it is modified") as error:
        prepare_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "\n" not in str(error.value)


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
    # and how to get the files without internet access, where this machine can
    how = {"mnist": f"fetch_mnist.py {tmp_path / 'nowhere'}", "fashion_mnist": "dataset-fashion-mnist"}
    assert how.get(name, "copy the files there") in message


@pytest.mark.parametrize("spelling", ["~/datasets", "$KDSEC_DATA/datasets", "${KDSEC_DATA}/datasets"])
def test_a_home_or_variable_root_reads_the_folder_it_names(tmp_path, monkeypatch, spelling):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KDSEC_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # a literal '~' or '$KDSEC_DATA' folder would be looked for here
    write_mnist(tmp_path / "datasets", train=100, test=50)
    assert dataset_root(DataConfig(root=spelling)) == (tmp_path / "datasets").resolve()
    bundle = prepare_data(DataConfig(name="mnist", root=spelling))
    assert sum(bundle.sizes().values()) == 150


def test_a_relative_root_resolves_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_imagefolder(tmp_path / "pets", per_class=10)
    assert dataset_root(DataConfig(root="pets/../pets")) == (tmp_path / "pets").resolve()
    bundle = prepare_data(DataConfig(name="imagefolder", root="pets", image_size=8, test_fraction=0.25,
                                     holdout_fraction=0.25))
    assert sum(bundle.sizes().values()) == 30


@pytest.mark.parametrize("spelling", ["$KDSEC_UNSET_ROOT/data", "${KDSEC_UNSET_ROOT}/data"])
def test_an_unset_variable_in_the_root_is_named(tmp_path, monkeypatch, spelling):
    monkeypatch.delenv("KDSEC_UNSET_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "$KDSEC_UNSET_ROOT" / "data").mkdir(parents=True)  # never silently taken literally
    with pytest.raises(DataError, match="environment variable 'KDSEC_UNSET_ROOT' is not set") as error:
        prepare_data(DataConfig(name="imagefolder", root=spelling))
    assert spelling in str(error.value) and "\n" not in str(error.value)


def test_a_missing_home_root_shows_what_was_written_and_where_it_led(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(name="mnist", root="~/nowhere"))
    assert f"data.root='~/nowhere' (= {(tmp_path / 'nowhere').resolve()})" in str(error.value)


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
