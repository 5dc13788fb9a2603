import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdsec.config import (ARCHES, load_run_config, DEFAULT_CONFIG, CNNStudentConfig, CNNTeacherConfig, HEMLPStudentConfig,
                          GatesConfig, HEMLPTeacherConfig, HECNNStudentConfig, PipelineConfig, ResNetStudentConfig,
                          ResNetTeacherConfig, arch_option_names, config_from_dict, load_config)
from kdsec.errors import ConfigError

CIFAR10_CONFIG = DEFAULT_CONFIG.parent / "cifar10.yaml"


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
    ("student.arch=nope", ("unknown model architecture 'nope' in student.arch "
                           "(known: he_cnn, he_mlp, resnet18, student_cnn, teacher_cnn)")),
    ("teacher.arch=resnet", "unknown model architecture 'resnet' in teacher.arch (known: he_cnn, he_mlp, "),
    ("student.hidden=[0]", "config key 'student.hidden.0': Input should be greater than 0"),
    ("student.train.epochz=3", "unknown config key 'student.train.epochz'"),
    ("teacher.width=64", ("config key 'teacher.width' is not an option of teacher.arch 'teacher_cnn' "
                          "(its options: channels, fc;")),
])
def test_bad_values_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(None, [override])
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
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.distill.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.student.hidden = [8]  # type: ignore[misc]
    assert Path(DEFAULT_CONFIG).is_file()


# Per-architecture options: `teacher` / `student` are discriminated unions on `arch`.

def test_every_registered_architecture_has_options_in_both_sections():
    from kdsec.models import MODELS

    assert sorted(ARCHES["teacher"]) == sorted(ARCHES["student"]) == MODELS.names()


@pytest.mark.parametrize(("section", "arch", "foreign", "options"), [
    ("student", "he_mlp", "channels=[8]", "hidden, pool"),
    ("student", "he_mlp", "width=8", "hidden, pool"),
    ("student", "student_cnn", "hidden=[8]", "channels, fc"),
    ("student", "teacher_cnn", "pool=2", "channels, fc"),
    ("student", "resnet18", "fc=8", "width"),
    ("teacher", "teacher_cnn", "width=8", "channels, fc"),
    ("teacher", "he_mlp", "channels=[8]", "hidden, pool"),
    ("teacher", "resnet18", "hidden=[8]", "width"),
    ("student", "he_cnn", "fc=8", "channels, kernel, stride, padding, conv_pool, hidden, batchnorm, pool"),
])
def test_an_option_of_another_arch_is_one_line_naming_it_and_the_arch(section, arch, foreign, options):
    key = foreign.split("=")[0]
    message = (f"config key '{section}.{key}' is not an option of {section}.arch '{arch}' "
               f"(its options: {options};")
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as caught:
        load_config(None, [f"{section}.arch={arch}", f"{section}.{foreign}"])
    assert "\n" not in str(caught.value)
    # The same from a section that names the arch itself (a file section, a Prefect parameter).
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        config_from_dict({section: {"arch": arch, key: yaml.safe_load(foreign.split("=")[1])}})


def test_an_option_of_another_arch_in_the_file_section_is_an_error(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("student: {arch: student_cnn, channels: [8, 16], hidden: [64]}\n")
    with pytest.raises(ConfigError, match=r"config key 'student\.hidden' is not an option of student\.arch "
                                          r"'student_cnn' \(its options: channels, fc;"):
        load_config(config_file)
    # Overriding the arch does not excuse it: `hidden` was never an option of the file's arch.
    with pytest.raises(ConfigError, match=r"config key 'student\.hidden' is not an option of student\.arch "
                                          r"'student_cnn' in '.*config\.yaml' \(its options: channels, fc;"):
        load_config(config_file, ["student.arch=he_mlp"])


def test_sections_without_arch_get_the_default_arch():
    config = config_from_dict({"teacher": {"channels": [8, 16]}, "student": {"hidden": [64, 16]}})
    assert config.teacher == CNNTeacherConfig(channels=[8, 16])
    assert config.student == HEMLPStudentConfig(hidden=[64, 16])


def test_an_he_mlp_teacher_gets_he_mlp_defaults_and_keeps_the_teacher_training():
    config = load_config(None, ["teacher.arch=he_mlp"])
    assert isinstance(config.teacher, HEMLPTeacherConfig)
    assert config.teacher.hidden == [32] and config.teacher.pool == 1
    assert config.teacher.model_options() == {"hidden": [32]}
    assert config.teacher.train == PipelineConfig().teacher.train  # the teacher's, not the student's
    assert not hasattr(config.teacher, "channels")


def test_an_arch_override_drops_the_files_options_of_its_old_arch():
    # cifar10.yaml: teacher_cnn [64, 128] / 256, he_mlp student hidden [128], pool 4.
    config = load_config(CIFAR10_CONFIG, ["student.arch=student_cnn", "teacher.arch=resnet18"])
    assert config.student == CNNStudentConfig(arch="student_cnn", channels=[16, 32], fc=64,
                                              train=config.student.train)
    assert config.student.train.epochs == 60 and config.student.train.augment == "crop_flip"  # the file's
    assert config.teacher == ResNetTeacherConfig(width=64, train=config.teacher.train)
    assert config.teacher.train.epochs == 40  # the file's
    # The new arch's options given with the override are kept.
    config = load_config(CIFAR10_CONFIG, ["student.arch=student_cnn", "student.fc=128", "teacher.arch=resnet18",
                                          "teacher.width=32"])
    assert config.student.model_options() == {"channels": [16, 32], "fc": 128}
    assert config.teacher.model_options() == {"width": 32}
    # An override to the file's own arch changes nothing; another arch's option by --set is an error.
    assert load_config(CIFAR10_CONFIG, ["student.arch=he_mlp"]) == load_config(CIFAR10_CONFIG)
    with pytest.raises(ConfigError, match=r"^config key 'student\.pool' is not an option of student\.arch "
                                          r"'student_cnn' \(its options: channels, fc;"):
        load_config(CIFAR10_CONFIG, ["student.arch=student_cnn", "student.pool=4"])


def test_an_arch_override_on_the_default_config_gives_the_documented_defaults():
    assert load_config(None, ["student.arch=student_cnn"]).student == CNNStudentConfig()
    assert load_config(None, ["student.arch=teacher_cnn"]).student == CNNStudentConfig(arch="teacher_cnn")
    assert load_config(None, ["student.arch=resnet18"]).student == ResNetStudentConfig()
    assert load_config(None, ["teacher.arch=student_cnn"]).teacher == CNNTeacherConfig(arch="student_cnn")
    assert load_config(None, ["teacher.arch=resnet18"]).teacher == ResNetTeacherConfig()
    # he_cnn takes he_mlp's option names hidden and pool too, but not the file's he_mlp values.
    assert load_config(None, ["student.arch=he_cnn"]).student == HECNNStudentConfig()


def test_an_he_cnn_has_at_least_one_conv_layer():
    with pytest.raises(ConfigError, match=r"^config key 'student\.channels': List should have at least 1 item"):
        load_config(None, ["student.arch=he_cnn", "student.channels=[]"])


@pytest.mark.parametrize(("options", "expected"), [
    # Exactly what ModelSpec.options got before (the former stages.arch_options): checkpoints depend on it.
    (CNNTeacherConfig(), {"channels": [32, 64], "fc": 128}),
    (CNNTeacherConfig(arch="student_cnn"), {"channels": [32, 64], "fc": 128}),
    (ResNetTeacherConfig(), {"width": 64}),
    (HEMLPTeacherConfig(), {"hidden": [32]}),
    (HEMLPStudentConfig(), {"hidden": [32]}),
    (HEMLPStudentConfig(hidden=[128], pool=4), {"hidden": [128], "pool": 4}),
    (CNNStudentConfig(), {"channels": [16, 32], "fc": 64}),
    (CNNStudentConfig(arch="teacher_cnn", channels=[8], fc=3), {"channels": [8], "fc": 3}),
    (ResNetStudentConfig(), {"width": 32}),
    (HECNNStudentConfig(), {"channels": [5], "kernel": 5, "stride": 2, "padding": 1, "conv_pool": 1, "hidden": [100],
                            "batchnorm": False, "pool": 1}),
])
def test_model_options_are_the_builders_keyword_arguments(options, expected):
    from kdsec.models import ModelSpec, build_model

    assert options.model_options() == expected
    assert sorted(arch_option_names("teacher", options.arch)) == sorted(arch_option_names("student", options.arch))
    assert set(expected) <= set(arch_option_names("student", options.arch))
    build_model(ModelSpec(options.arch, (3, 32, 32), 10, options.model_options()))


def test_default_model_options_are_unchanged():
    config = load_config()
    assert config.teacher.model_options() == {"channels": [32, 64], "fc": 128}
    assert config.student.model_options() == {"hidden": [32]}
    cifar10 = load_config(CIFAR10_CONFIG)
    assert cifar10.teacher.model_options() == {"channels": [64, 128], "fc": 256}
    assert cifar10.student.model_options() == {"hidden": [128], "pool": 4}


@pytest.mark.parametrize(("options", "factor", "expected"), [
    (HEMLPStudentConfig(hidden=[32, 3], pool=4), 0.5, {"hidden": [16, 2], "pool": 4}),
    (HEMLPStudentConfig(hidden=[1]), 0.25, {"hidden": [1]}),
    (CNNStudentConfig(), 2.0, {"channels": [32, 64], "fc": 128}),
    (CNNStudentConfig(channels=[16, 33], fc=65), 0.5, {"channels": [8, 16], "fc": 32}),
    (ResNetStudentConfig(), 1.5, {"width": 48}),
    (HECNNStudentConfig(channels=[6, 3], hidden=[100], kernel=3, pool=2), 0.5,
     {"channels": [3, 2], "kernel": 3, "stride": 2, "padding": 1, "conv_pool": 1, "hidden": [50], "batchnorm": False,
      "pool": 2}),
])
def test_scaled_multiplies_the_archs_widths_only(options, factor, expected):
    from kdsec.sweep import scaled_student

    scaled = scaled_student(options, factor)
    assert type(scaled) is type(options) and scaled.arch == options.arch
    assert scaled.model_options() == expected
    assert scaled.train == options.train and scaled.dp == options.dp
    assert scaled_student(options, 1.0) is options


def test_a_sweep_member_scales_the_configured_student():
    from kdsec.sweep import sweep_grid

    config = load_config(None, ["student.arch=student_cnn", "sweep.width=[0.5]"])
    (member,) = sweep_grid(config)
    assert member.apply(config).student.model_options() == {"channels": [8, 16], "fc": 32}


@pytest.mark.parametrize("overrides", [[], ["student.arch=resnet18", "teacher.arch=he_mlp", "teacher.pool=2"],
                                       ["student.arch=teacher_cnn", "student.channels=[4]"]])
def test_yaml_and_digest_round_trip_every_arch(tmp_path, overrides):
    config = load_config(None, overrides)
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    reloaded = load_config(saved)
    assert reloaded == config and reloaded.digest() == config.digest()
    assert config_from_dict(config.model_dump(mode="json")) == config
    assert next(iter(yaml.safe_load(config.to_yaml())["student"])) == "arch"


def test_switching_between_archs_that_share_options_keeps_the_files_values():
    """teacher_cnn ↔ student_cnn take the same options: an arch override keeps the file's widths."""
    config = load_config(DEFAULT_CONFIG.parent / "cifar10.yaml", ["teacher.arch=student_cnn"])
    assert config.teacher.arch == "student_cnn"
    assert config.teacher.model_options() == {"channels": [64, 128], "fc": 256}


def test_a_run_config_saved_before_per_arch_options_still_loads(tmp_path):
    """``kdsec audit`` re-reads a registered version's config.yaml; one saved when every
    architecture's options sat in teacher/student loads with only its own arch's options."""
    old = tmp_path / "config.yaml"
    old.write_text("teacher: {arch: teacher_cnn, channels: [32, 64], fc: 128, width: 64}\n"
                   "student: {arch: he_mlp, hidden: [32], pool: 1, channels: [16, 32], fc: 64, width: 32}\n")
    with pytest.raises(ConfigError, match="'teacher.width' is not an option of teacher.arch 'teacher_cnn'"):
        load_config(old, [])
    config = load_run_config(old)
    assert config.teacher.model_options() == {"channels": [32, 64], "fc": 128}
    assert config.student.model_options() == {"hidden": [32]}


def test_the_documented_gate_table_states_the_real_defaults():
    """Every default the gate table (docs/pipeline.md) states is GatesConfig's (it once said
    extraction and calibration default to 1.0, warn only, while they fail at 0.99 and 0.10)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    table = page.split("## Gates (thresholds in `gates.*`)\n\n")[1].split("\n\n")[0]
    number = r"(-?\d+(?:\.\d+)?)"
    stated = re.findall(rf"`(\w+)` \((?:default )?{number}", table) + re.findall(rf"`(\w+)`, {number}", table)
    assert {name for name, _ in stated} >= {"max_extraction_fidelity", "warn_extraction_fidelity", "max_ece", "warn_ece",
                                            "min_explanation_spearman", "warn_explanation_spearman"}
    defaults = GatesConfig()
    assert [(name, float(value)) for name, value in stated] == [(name, getattr(defaults, name)) for name, _ in stated]
