"""The explanation trust check on real data and real models: digits with the pipeline's own
trainers, MNIST- and CIFAR-shaped fixtures read by the real loaders; the explanation gate in both
directions; bad settings as one-line config errors."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import pytest

from kdsec import roles, trainers
from kdsec.compress.quantize import quantize_dynamic_int8
from kdsec.config import AttributionMethod, DataConfig, ExplainConfig, GatesConfig, load_config
from kdsec.data import prepare_data
from kdsec.errors import ConfigError
from kdsec.explain import ATTRIBUTIONS, explain_models
from kdsec.explain.figure import FIGURE_IMAGES
from kdsec.explain.scores import spearman, top_k_overlap
from kdsec.fileio import strict_json
from kdsec.gates import Gate, Metric, evaluate_gates
from kdsec.models import ModelSpec, build_model
from kdsec.summary import ExplanationsSummary
from kdsec.train import fit, seed_everything
from tests.conftest import SMALL_OVERRIDES
from tests.vision_fixtures import write_cifar10, write_mnist

FAST = ExplainConfig(sample_size=60, ig_steps=8, deletion_steps=8, bootstrap=50)


@pytest.fixture(scope="module")
def digits_models(digits, tmp_path_factory):
    """The small flow config's teacher and students (as the flow test trains them), an int8 copy of
    the KD student, and two students unrelated to the teacher: untrained, and fit to shuffled labels."""
    folder = tmp_path_factory.mktemp("explain")
    config = load_config(None, SMALL_OVERRIDES)
    teacher = trainers.train_teacher(config, digits, folder / "teacher.safetensors")
    scratch = trainers.train_scratch_student(config, digits, folder / "scratch.safetensors")
    kd = trainers.distill_student(config, digits, teacher, folder / "kd.safetensors")
    spec = trainers.student_spec(config, digits)
    seed_everything(1)
    random_init = build_model(spec).eval()
    seed_everything(2)
    shuffled = build_model(spec)
    labels = np.random.default_rng(0).permutation(digits.y_train)
    fit(shuffled, digits.x_train, labels, digits.x_train, labels,
        config.student.train.model_copy(update={"epochs": 40, "patience": 40}), seed=0, label="shuffled")
    return {roles.TEACHER: teacher.load(), roles.SCRATCH_STUDENT: scratch.load(), roles.KD_STUDENT: kd.load(),
            "variant:int8": quantize_dynamic_int8(kd.load()), "random_init": random_init,
            "shuffled_labels": shuffled.eval()}


def _gate_level(spearman_value: float) -> str:
    verdict = next(v for v in evaluate_gates({Metric.EXPLANATION_SPEARMAN: spearman_value}, GatesConfig())
                   if v.name == Gate.EXPLANATION)
    return verdict.checks[0].level


def test_the_methods_config_accepts_are_the_registered_ones():
    assert ATTRIBUTIONS.names() == sorted(get_args(AttributionMethod))


def test_a_pipeline_run_on_digits_explains_every_model_and_draws_the_grid(digits, digits_models, tmp_path):
    pipeline = {role: digits_models[role] for role in
                (roles.TEACHER, roles.SCRATCH_STUDENT, roles.KD_STUDENT, "variant:int8")}
    result = explain_models(pipeline, digits, FAST, "variant:int8", tmp_path)
    assert set(result.models) == {*pipeline, roles.CANDIDATE}
    assert result.models[roles.CANDIDATE].attributed_with == "kd_student (float source)"
    assert result.models[roles.KD_STUDENT].attributed_with == roles.KD_STUDENT
    teacher = result.models[roles.TEACHER].methods["saliency"]
    assert teacher.spearman is None and teacher.top_k_overlap is None
    for role in (roles.SCRATCH_STUDENT, roles.KD_STUDENT, roles.CANDIDATE):
        for scores in result.models[role].methods.values():
            low, high = scores.spearman_ci
            assert low <= scores.spearman <= high and 0 <= scores.top_k_overlap <= 1
    # Faithful maps: removing the ink pixels Integrated Gradients ranks first breaks the models sooner
    # than removing ink pixels in a random order (both orders leave the black pixels for last).
    for role in (roles.TEACHER, roles.KD_STUDENT):
        assert result.models[role].methods["integrated_gradients"].faithfulness_gap_ci[0] > 0
    # The int8 candidate has its float source's maps but its own deletion curve.
    assert result.models[roles.CANDIDATE].methods["saliency"].spearman == \
        result.models[roles.KD_STUDENT].methods["saliency"].spearman
    # The sample: seeded, a share misclassified by a student, the figure's rows from it.
    sample = result.sample
    assert sample.size == len(sample.indices) == 60 and 0 < len(sample.misclassified) <= 15
    assert set(sample.misclassified) <= set(sample.indices) and set(sample.figure_rows) <= set(sample.indices)
    assert len(sample.figure_rows) == FIGURE_IMAGES and set(sample.figure_rows) & set(sample.misclassified)
    assert explain_models(pipeline, digits, FAST, "variant:int8").sample == sample
    assert (tmp_path / "explain" / "attributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.figure == str(tmp_path / "explain" / "attributions.png")
    # MLflow metrics and the summary's section.
    metrics = result.metrics()
    assert metrics["explain.candidate.saliency.spearman"] == result.candidate_spearman
    assert "explain.teacher.saliency.spearman" not in metrics and metrics["explain_seconds"] > 0
    document = json.loads(strict_json(result.as_dict()))
    assert document["models"]["teacher"]["methods"]["saliency"]["spearman_ci"] == [None, None]
    assert ExplanationsSummary.model_validate(document).candidate.methods["saliency"].spearman == \
        result.candidate_spearman


def test_the_gate_passes_a_distilled_student_and_fails_unrelated_ones(digits, digits_models):
    teacher = digits_models[roles.TEACHER]
    values = {}
    for role in (roles.KD_STUDENT, "random_init", "shuffled_labels"):
        result = explain_models({roles.TEACHER: teacher, role: digits_models[role]}, digits, FAST, role)
        values[role] = result.candidate_spearman
    assert _gate_level(values[roles.KD_STUDENT]) == "pass", values
    assert _gate_level(values["random_init"]) == "fail", values
    assert _gate_level(values["shuffled_labels"]) == "fail", values


def test_mlp_on_mnist_shaped_and_conv_on_cifar_shaped_images(tmp_path):
    write_mnist(tmp_path, train=300, test=100)
    write_cifar10(tmp_path, per_batch=60, test=100)
    cases = [(DataConfig(name="mnist", root=str(tmp_path)), "he_mlp", {"hidden": [16]}),
             (DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False, normalize="given",
                         mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), "student_cnn",
              {"channels": [4, 8], "fc": 16})]
    config = ExplainConfig(sample_size=24, ig_steps=4, deletion_steps=4, bootstrap=20)
    for data, student_arch, options in cases:
        bundle = prepare_data(data)
        models = {}
        for role, arch, arch_options in ((roles.TEACHER, "teacher_cnn", {"channels": [8, 16], "fc": 32}),
                                         (roles.KD_STUDENT, student_arch, options)):
            seed_everything(0)
            model = build_model(ModelSpec(arch, bundle.input_shape, bundle.num_classes, arch_options))
            fit(model, bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val,
                load_config(None, []).student.train.model_copy(update={"epochs": 3}), label=role)
            models[role] = model
        result = explain_models(models, bundle, config, roles.KD_STUDENT, tmp_path / data.name)
        scores = result.models[roles.CANDIDATE].methods
        assert set(scores) == {"integrated_gradients", "saliency"}
        assert all(np.isfinite([s.spearman, s.top_k_overlap, s.deletion_auc]).all() for s in scores.values())
        assert len(result.fractions) == 5 and result.fractions[0] == 0 and result.fractions[-1] == 1
        assert (tmp_path / data.name / "explain" / "attributions.png").is_file()


def test_agreement_is_measured_on_the_pixels_that_are_not_black():
    maps = np.array([[[0.0, 0.0, 1.0, 2.0, 3.0]]])
    same_order = np.array([[[5.0, 9.0, 1.0, 2.0, 3.0]]])  # disagrees only where the image is black
    ink = np.array([[[False, False, True, True, True]]])
    assert spearman(maps, same_order, ink)[0] == pytest.approx(1.0)
    assert spearman(maps, same_order, np.ones_like(ink))[0] < 0.5
    assert top_k_overlap(maps, same_order, ink, 34)[0] == 1.0
    assert spearman(maps, np.zeros_like(maps), ink)[0] == 0.0  # a constant map ranks nothing


@pytest.mark.parametrize("override,message", [
    ("explain.sample_size=0", "config key 'explain.sample_size': Input should be greater than 0"),
    ("explain.methods=[gradcam]", "config key 'explain.methods.0': Input should be 'integrated_gradients' or"),
    ("explain.primary=integrated_gradients", None),
    ("gates.warn_explanation_spearman=0.01", "must not be below gates.min_explanation_spearman"),
])
def test_bad_settings_are_one_line_config_errors(override, message):
    if message is None:  # a primary method that is not computed
        with pytest.raises(ConfigError, match="explain.primary.*not in explain.methods") as caught:
            load_config(None, [override, "explain.methods=[saliency]"])
    else:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_switched_off_the_gate_is_skipped():
    from kdsec.gates import switched_off_gates

    off = switched_off_gates(load_config(None, ["explain.enabled=false"]))
    assert off == {Gate.EXPLANATION}
    verdict = next(v for v in evaluate_gates({}, GatesConfig(), off) if v.name == Gate.EXPLANATION)
    assert verdict.passed and verdict.checks[0].level == "skipped"
