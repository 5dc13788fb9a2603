from pathlib import Path

import pytest

from kdsec.config import DEFAULT_CONFIG, PipelineConfig, load_config
from kdsec.errors import ConfigError


def test_default_yaml_matches_the_typed_defaults():
    assert load_config() == PipelineConfig()


def test_dotted_overrides_reach_nested_keys():
    config = load_config(DEFAULT_CONFIG, ["distill.temperature=4", "data.seed=1", "student.hidden=[16, 8]",
                                          "teacher.train.lr=0.01"])
    assert config.distill.temperature == 4.0
    assert config.data.seed == 1
    assert config.student.hidden == [16, 8]
    assert config.teacher.train.lr == 0.01


@pytest.mark.parametrize(("override", "message"), [
    ("distill.temperatur=4", "unknown config key 'distill.temperatur'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("distill.temperature=-1", "config key 'distill.temperature': Input should be greater than 0"),
    ("compress.sparsity=1.0", "config key 'compress.sparsity': Input should be less than 1"),
    ("compress.sparsity=-0.1", "config key 'compress.sparsity': Input should be greater than or equal to 0"),
    ("distill.alpha=1.5", "config key 'distill.alpha'"),
    ("data.seed=abc", "config key 'data.seed': Input should be a valid integer"),
    ("data.test_fraction=0.65", "leaves under 10% for training"),
    ("encrypt.he.poly_modulus_degree=1000", "config key 'encrypt.he.poly_modulus_degree'"),
    ("distill", "must look like dotted.key=value"),
])
def test_bad_values_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_file_must_be_a_mapping(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_unknown_names_in_registries_are_config_errors(digits):
    from kdsec.data import DATASETS
    from kdsec.distill import LOSSES

    with pytest.raises(ConfigError, match="unknown dataset 'cifar100' in data.name"):
        DATASETS.get("cifar100")
    with pytest.raises(ConfigError, match="unknown distillation loss"):
        LOSSES.get("nope")


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(Exception):
        config.distill.temperature = 2.0  # type: ignore[misc]
    assert Path(DEFAULT_CONFIG).is_file()
