import math

from kdsec.config import GatesConfig
from kdsec.gates import all_passed, evaluate_gates

GOOD = {
    "candidate.test_accuracy": 0.97, "candidate.accuracy_drop_vs_teacher": 0.01,
    "candidate.membership_auc": 0.52, "candidate.membership_tpr_at_low_fpr": 0.01,
    "he.agreement": 1.0, "at_rest.roundtrip_exact": 1.0, "at_rest.tamper_rejected": 1.0,
    "at_rest.wrong_key_rejected": 1.0, "at_rest.manifest_tamper_rejected": 1.0, "at_rest.unsigned_rejected": 1.0,
    "at_rest.model_signature_verified": 1.0,
    "candidate.extraction_fidelity_top1": 0.9, "candidate.ece": 0.02, "candidate.explanation_spearman": 0.2,
}


def test_all_gates_pass_on_good_metrics():
    verdicts = evaluate_gates(GOOD, GatesConfig())
    assert [v.name for v in verdicts] == ["accuracy", "membership", "he", "at_rest", "extraction", "calibration",
                                          "explanation"]
    assert all_passed(verdicts)


def test_each_gate_fails_alone_and_names_itself():
    breaking = {
        "accuracy": {"candidate.accuracy_drop_vs_teacher": 0.05},
        "membership": {"candidate.membership_auc": 0.7},
        "he": {"he.agreement": 0.9},
        "at_rest": {"at_rest.tamper_rejected": 0.0},
        "calibration": {"candidate.ece": math.nan},
        "explanation": {"candidate.explanation_spearman": 0.0},
    }
    for gate, change in breaking.items():
        verdicts = evaluate_gates({**GOOD, **change}, GatesConfig())
        assert [v.name for v in verdicts if not v.passed] == [gate]


def test_missing_or_nan_metric_fails():
    metrics = dict(GOOD)
    del metrics["he.agreement"]
    metrics["candidate.membership_auc"] = math.nan
    failed = {v.name for v in evaluate_gates(metrics, GatesConfig()) if not v.passed}
    assert failed == {"he", "membership"}


def test_thresholds_come_from_config():
    verdicts = evaluate_gates(GOOD, GatesConfig(min_accuracy=0.99))
    accuracy = next(v for v in verdicts if v.name == "accuracy")
    assert not accuracy.passed and accuracy.checks[0].threshold == 0.99


def test_warn_level_passes_but_is_reported():
    verdicts = {v.name: v for v in evaluate_gates({**GOOD, "candidate.membership_auc": 0.57,
                                                    "candidate.extraction_fidelity_top1": 0.97}, GatesConfig())}
    assert all_passed(verdicts.values())
    assert verdicts["membership"].level == "warn" and verdicts["membership"].warnings == ["candidate.membership_auc"]
    assert verdicts["extraction"].level == "warn" and verdicts["accuracy"].level == "pass"
    failing = {v.name: v for v in evaluate_gates({**GOOD, "candidate.extraction_fidelity_top1": 0.97},
                                                 GatesConfig(max_extraction_fidelity=0.96, warn_extraction_fidelity=0.9))}
    assert failing["extraction"].level == "fail"


def test_optional_gate_is_skipped_when_its_stage_is_off():
    metrics = {k: v for k, v in GOOD.items() if k != "candidate.extraction_fidelity_top1"}
    extraction = next(v for v in evaluate_gates(metrics, GatesConfig()) if v.name == "extraction")
    assert extraction.passed and extraction.checks[0].level == "skipped"


def test_a_gate_whose_stage_is_switched_off_is_skipped_not_failed():
    metrics = {k: v for k, v in GOOD.items() if k != "he.agreement"}
    assert not all_passed(evaluate_gates(metrics, GatesConfig()))  # missing while on: fails
    he = next(v for v in evaluate_gates(metrics, GatesConfig(), frozenset({"he"})) if v.name == "he")
    assert he.passed and [c.level for c in he.checks] == ["skipped"]
    from kdsec.config import load_config
    from kdsec.gates import switched_off_gates
    assert switched_off_gates(load_config(None, ["encrypt.he.enabled=false"])) == {"he"}
    assert switched_off_gates(load_config(None, [])) == frozenset()


def test_warn_above_fail_is_a_config_error():
    import pytest

    from kdsec.config import config_from_dict
    from kdsec.errors import ConfigError
    with pytest.raises(ConfigError, match="warn_auc"):
        config_from_dict({"gates": {"warn_auc": 0.7, "max_auc": 0.6}})


# From benchmarks/gate_defaults.py on digits: a constant-answer model is copied at fidelity 1.0;
# ECE of students overfit to 20 images (logits × 10) and of the KD student with logits ÷ 3, ÷ 10.
TRIVIALLY_EXTRACTABLE = 1.0
BADLY_CALIBRATED = (0.2395, 0.2168, 0.6833)
# The default config's candidate over 5 seeds: the highest fidelity (seed 0) and ECE seen, and the means.
MEASURED_DEFAULTS = ({"candidate.extraction_fidelity_top1": 0.9667, "candidate.ece": 0.0234},
                     {"candidate.extraction_fidelity_top1": 0.9372, "candidate.ece": 0.0225})


def test_trivially_extractable_or_badly_calibrated_fails_under_the_defaults():
    extractable = evaluate_gates({**GOOD, "candidate.extraction_fidelity_top1": TRIVIALLY_EXTRACTABLE}, GatesConfig())
    assert [v.name for v in extractable if not v.passed] == ["extraction"]
    for ece in BADLY_CALIBRATED:
        verdicts = evaluate_gates({**GOOD, "candidate.ece": ece}, GatesConfig())
        assert [v.name for v in verdicts if not v.passed] == ["calibration"]


def test_measured_default_candidate_passes_the_defaults():
    for measured in MEASURED_DEFAULTS:
        assert all_passed(evaluate_gates({**GOOD, **measured}, GatesConfig()))


def test_default_yaml_gates_are_the_class_defaults():
    from kdsec.config import load_config
    assert load_config(None, []).gates == GatesConfig()
