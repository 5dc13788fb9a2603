"""kdsec's own CIFAR-10 reader, on real files: each file is read once, its md5 taken of exactly
those bytes, and those bytes unpickled data-only, so a planted pickle never runs whatever the
spelling of data.root or the checksum setting."""

import hashlib
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from kdsec.config import DataConfig
from kdsec.data import DATASETS, prepare_data, vision
from kdsec.errors import DataError
from tests.vision_fixtures import write_cifar10

FOLDER = CIFAR10.base_folder


class _Payload:
    """Plain ``pickle.load`` of this touches ``marker`` through a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _plant_payload(folder: Path, file_name: str, marker: Path) -> None:
    payload = pickle.dumps({"data": _Payload(marker), "labels": [0], "label_names": _Payload(marker)})
    pickle.loads(payload)  # the payload is real: a generic unpickler runs it
    assert marker.exists()
    marker.unlink()
    (folder / file_name).write_bytes(payload)


@pytest.fixture
def official_md5s(monkeypatch):
    """Register a fixture's md5 sums as the official ones (the real files cannot ship with the tests)."""

    def register(root: Path) -> None:
        def md5(name: str) -> str:
            return hashlib.md5((root / FOLDER / name).read_bytes()).hexdigest()

        monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(name)] for name, _ in CIFAR10.train_list])
        monkeypatch.setattr(CIFAR10, "test_list", [[name, md5(name)] for name, _ in CIFAR10.test_list])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})

    return register


def _load(root: str, verify: bool, **overrides) -> vision.RawDataset:
    return DATASETS.get("cifar10")(DataConfig(name="cifar10", root=root, verify_checksums=verify, **overrides))


@pytest.mark.parametrize("spelling", ["~/datasets", "$KDSEC_DATA/datasets", "${KDSEC_DATA}/datasets"])
@pytest.mark.parametrize("file_name", ["data_batch_3", "batches.meta"])
@pytest.mark.parametrize("verify, refusal", [(False, "unsafe"), (True, "official CIFAR-10 checksum")])
def test_a_planted_pickle_never_runs_whatever_the_root_spelling(tmp_path, monkeypatch, official_md5s, spelling,
                                                                file_name, verify, refusal):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KDSEC_DATA", str(tmp_path))
    write_cifar10(tmp_path / "datasets", per_batch=20, test=30)
    official_md5s(tmp_path / "datasets")
    marker = tmp_path / "pwned"
    _plant_payload(tmp_path / "datasets" / FOLDER, file_name, marker)
    with pytest.raises(DataError, match=refusal) as error:
        _load(spelling, verify)
    assert file_name in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_official_bytes_load_and_a_modified_file_is_named(tmp_path, official_md5s):
    write_cifar10(tmp_path, per_batch=20, test=30)
    official_md5s(tmp_path)
    verified = _load(str(tmp_path), verify=True)
    assert verified.inputs.shape == (130, 3, 32, 32) and verified.class_names[0] == "airplane"
    batch_path = tmp_path / FOLDER / "data_batch_2"
    batch = pickle.loads(batch_path.read_bytes())  # the test's own fixture
    batch["data"][0, 0] ^= 1
    batch_path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="does not match the official CIFAR-10 checksum: it is modified") as error:
        _load(str(tmp_path), verify=True)
    assert "data_batch_2" in str(error.value) and "data.verify_checksums: false" in str(error.value)
    own_copy = _load(str(tmp_path), verify=False)  # the user's own copy, same format
    assert (own_copy.inputs != verified.inputs).sum() == 1


def test_images_and_labels_match_torchvision(tmp_path, official_md5s):
    write_cifar10(tmp_path, per_batch=20, test=30)
    official_md5s(tmp_path)  # so torchvision's own reader accepts the fixture (trusted: written above)
    parts = [CIFAR10(str(tmp_path), train=train) for train in (True, False)]
    raw = _load(str(tmp_path), verify=True)
    expected = np.concatenate([part.data for part in parts]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_array_equal(raw.inputs, expected)
    np.testing.assert_array_equal(raw.labels, np.concatenate([part.targets for part in parts]))
    assert raw.class_names == parts[0].classes


@pytest.mark.parametrize("verify", [False, True])
def test_a_missing_folder_or_file_is_an_error(tmp_path, verify):
    with pytest.raises(DataError, match=f"not found .*no folder {FOLDER}"):
        _load(str(tmp_path), verify)
    write_cifar10(tmp_path, per_batch=20, test=30)
    (tmp_path / FOLDER / "data_batch_4").unlink()
    with pytest.raises(DataError, match="not found .*no file data_batch_4"):
        _load(str(tmp_path), verify)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    write_cifar10(tmp_path, per_batch=20, test=30)
    monkeypatch.setattr(vision, "_CIFAR_MAX_FILE_BYTES", 10_000)  # the fixture's batches are ~61 kB
    with pytest.raises(DataError, match="data_batch_1' is .* bytes, over the limit"):
        _load(str(tmp_path), verify=False)


@pytest.mark.timeout(30)  # a FIFO opened for a blocking read would hang here
@pytest.mark.parametrize("plant", [os.mkdir, os.mkfifo])
def test_a_batch_that_is_not_a_regular_file_is_refused(tmp_path, plant):
    write_cifar10(tmp_path, per_batch=20, test=30)
    (tmp_path / FOLDER / "test_batch").unlink()
    plant(tmp_path / FOLDER / "test_batch")
    with pytest.raises(DataError, match="test_batch' is not a regular file"):
        _load(str(tmp_path), verify=False)


ROWS = np.zeros((2, 3072), dtype=np.uint8)


@pytest.mark.parametrize("file_name, content, problem", [
    ("data_batch_1", [ROWS, [0, 1]], "holds a list, not a dict"),
    ("data_batch_1", {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, "shape \\(2, 100\\)"),
    ("data_batch_1", {"data": ROWS.astype(np.float32), "labels": [0, 1]}, "'data' is a float32 array"),
    ("data_batch_1", {"labels": [0, 1]}, "'data' is a NoneType"),
    ("data_batch_1", {"data": ROWS, "labels": [0]}, "'labels' is not a list of 2 integers"),
    ("test_batch", {"data": ROWS, "fine_labels": ["cat", "dog"]}, "'labels' is not a list of 2 integers"),
    ("batches.meta", {"num_vis": 3072}, "'label_names' is not a list of class names"),
    ("batches.meta", b"\x80\x04truncated", "or unsafe"),
])
def test_a_batch_of_the_wrong_structure_is_corrupt_on_one_line(tmp_path, file_name, content, problem):
    write_cifar10(tmp_path, per_batch=20, test=30)
    raw = content if isinstance(content, bytes) else pickle.dumps(content)
    (tmp_path / FOLDER / file_name).write_bytes(raw)
    with pytest.raises(DataError, match=f"{file_name}' is corrupt.*{problem}") as error:
        _load(str(tmp_path), verify=False)
    assert "\n" not in str(error.value)


def test_a_batch_pickled_with_protocol_5_loads(tmp_path):
    """User copies written by newer Pythons (protocol 5 stores arrays through numpy's _frombuffer)."""
    write_cifar10(tmp_path, per_batch=20, test=30)
    reference = _load(str(tmp_path), verify=False)
    batch_path = tmp_path / FOLDER / "data_batch_1"
    batch_path.write_bytes(pickle.dumps(pickle.loads(batch_path.read_bytes()), protocol=5))
    np.testing.assert_array_equal(_load(str(tmp_path), verify=False).inputs, reference.inputs)


def test_the_pooled_set_keeps_the_split_contract(tmp_path):
    write_cifar10(tmp_path, per_batch=20, test=30)
    bundle = prepare_data(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False, max_samples=100))
    assert sum(bundle.sizes().values()) == 100 and bundle.input_shape == (3, 32, 32)


def test_download_fetches_only_missing_files_through_the_md5_checked_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename, md5):  # stands in for the network: unpacks a fixture
        calls.append((url, filename, md5))
        write_cifar10(Path(download_root), per_batch=20, test=30)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    assert len(_load(str(tmp_path), verify=False, download=True).labels) == 130
    assert calls == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)]
    _load(str(tmp_path), verify=False, download=True)  # all files there: nothing is fetched or overwritten
    assert len(calls) == 1

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cifar10 download into data.root='.*' failed \\(network is unreachable\\)"):
        _load(str(tmp_path / "elsewhere"), verify=False, download=True)
