"""The full-size dataset configs validate, run their HE stage on an HE-friendly student, and the
full-size synthetic files benchmarks/full_size.py writes are read by the real loaders."""

import numpy as np
import pytest

from kdsec.config import DEFAULT_CONFIG, DataConfig, load_config
from kdsec.he.program import HE_FRIENDLY_ARCHS, he_program
from kdsec.data import prepare_data
from kdsec.models import ModelSpec, build_model
from tests.vision_fixtures import varied_digit_images, write_cifar10, write_mnist

FULL_SIZE_CONFIGS = ["mnist", "fashion_mnist"]


@pytest.mark.parametrize("name", FULL_SIZE_CONFIGS)
def test_full_size_config_validates_with_an_he_friendly_student(name):
    config = load_config(DEFAULT_CONFIG.parent / f"{name}.yaml")
    assert config.data.name == name and config.data.max_samples == 0  # the whole data set
    assert config.student.arch in HE_FRIENDLY_ARCHS and config.encrypt.he.enabled
    assert config.gates.min_he_agreement >= 0.999
    student = build_model(ModelSpec(config.student.arch, (1, 28, 28), 10, config.student.model_options()))
    preprocess, ops = he_program(student)  # raises on a layer without a homomorphic form
    assert preprocess(np.zeros((2, 1, 28, 28), dtype=np.float32)).shape == (2, (28 // config.student.pool) ** 2)
    assert ops[0].weight.shape[1] == (28 // config.student.pool) ** 2


def test_varied_images_are_learnable_patterns_not_copies():
    images, labels = varied_digit_images(2000, 28, seed=0, chunk=700)
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8 and set(labels) == set(range(10))
    assert (images[:, 0, :] == 0).mean() > 0.5  # background black, as in MNIST
    assert len({image.tobytes() for image in images}) == len(images)
    assert not np.array_equal(varied_digit_images(10, 28, seed=1)[0], images[:10])


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_synthetic_idx_files_are_read_by_the_real_loader(tmp_path, name, folder):
    write_mnist(tmp_path, folder, train=600, test=100, draw=varied_digit_images)
    bundle = prepare_data(DataConfig(name=name, root=str(tmp_path)))
    assert bundle.input_shape == (1, 28, 28) and sum(bundle.sizes().values()) == 700


def test_synthetic_cifar10_batches_are_read_by_the_real_loader(tmp_path):
    write_cifar10(tmp_path, per_batch=100, test=100, draw=varied_digit_images)
    bundle = prepare_data(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False))
    assert bundle.input_shape == (3, 32, 32) and sum(bundle.sizes().values()) == 600
