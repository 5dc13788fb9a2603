import math
from types import SimpleNamespace

from kdsec.config import GatesConfig
from kdsec.gates import all_passed, evaluate_gates, gate_metrics

GOOD = {
    "candidate.test_accuracy": 0.97, "candidate.accuracy_drop_vs_teacher": 0.01,
    "candidate.membership_auc": 0.52, "candidate.membership_tpr_at_low_fpr": 0.01,
    "he.agreement": 1.0, "he.agreement_with_model": 1.0, "he.host_had_no_secret_key": 1.0,
    "at_rest.roundtrip_exact": 1.0, "at_rest.tamper_rejected": 1.0,
    "at_rest.wrong_key_rejected": 1.0, "at_rest.manifest_tamper_rejected": 1.0, "at_rest.unsigned_rejected": 1.0,
    "at_rest.model_signature_verified": 1.0,
    "candidate.extraction_fidelity_top1": 0.9, "candidate.ece": 0.02, "candidate.explanation_spearman": 0.2,
}


def test_all_gates_pass_on_good_metrics():
    verdicts = evaluate_gates(GOOD, GatesConfig())
    assert [v.name for v in verdicts] == ["accuracy", "membership", "he", "at_rest", "extraction", "calibration",
                                          "explanation", "dp_audit"]
    assert all_passed(verdicts)  # dp_audit: no DP run here, so skipped


def test_each_gate_fails_alone_and_names_itself():
    breaking = {
        "accuracy": {"candidate.accuracy_drop_vs_teacher": 0.05},
        "membership": {"candidate.membership_auc": 0.7},
        "he": {"he.agreement": 0.9},
        "at_rest": {"at_rest.tamper_rejected": 0.0},
        "calibration": {"candidate.ece": math.nan},
        "explanation": {"candidate.explanation_spearman": 0.0},
        "dp_audit": {"dp_student.epsilon_within_accountant": 0.0},  # the one-run audit refuted the DP claim
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
    assert he.passed and [c.level for c in he.checks] == ["skipped"] * 4
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


# --- worst cases: the membership gate over attacks, the he gate over runs and against the shipped model --

def _attack(name: str, auc: float, tpr: float):
    return SimpleNamespace(attack=name, auc=auc, tpr_at_low_fpr=tpr)


def _audit(*attacks):
    """A candidate audit whose ``membership`` is the attack with the highest TPR (then AUC), as
    ``kdsec.audit.run.strongest`` picks it."""
    by_name = {attack.attack: attack for attack in attacks}
    return SimpleNamespace(attacks=by_name, membership=max(attacks, key=lambda a: (a.tpr_at_low_fpr, a.auc)),
                           calibration=SimpleNamespace(ece=0.02))


AT_REST_PROVEN = SimpleNamespace(roundtrip_exact=True, tamper_rejected=True, wrong_key_rejected=True,
                                 manifest_tamper_rejected=True, unsigned_rejected=True, model_signature_verified=True)


def _he_run(mode: str, path: str, agreement: float = 1.0, with_model: float = 1.0, secret: bool = False):
    from kdsec.he.result import HERun

    return HERun(mode=mode, path=path, samples=100, agreement=agreement, agreement_with_model=with_model,
                 max_abs_logit_error=1e-3, ms_per_sample=1.0, server_ms_per_sample=0.5, ciphertext_bytes_in=1,
                 ciphertext_bytes_out=1, public_context_bytes=1, package_bytes=1, poly_modulus_degree=8192,
                 coeff_mod_bit_sizes=(60, 30, 60), scale_bits=30, host_had_secret_key=secret)


def _he(*runs):
    from kdsec.he.result import HEResult

    return HEResult(list(runs))


QUIET_ATTACKS = _audit(_attack("loss", 0.52, 0.01), _attack("rmia", 0.53, 0.02), _attack("lira", 0.52, 0.015))
AGREEING_HE = _he(_he_run("encrypted_input", "batched"), _he_run("encrypted_model", "batched"))


def _verdicts(audit=QUIET_ATTACKS, he=AGREEING_HE):
    metrics = gate_metrics(0.98, 0.97, audit, he, AT_REST_PROVEN)
    return {verdict.name: verdict for verdict in evaluate_gates(metrics, GatesConfig())}


def test_membership_gate_fails_on_an_attack_stronger_in_auc_than_the_one_leading_in_tpr():
    # LiRA leads at low FPR (so it is the "strongest" attack) with an AUC under max_auc (0.6);
    # RMIA's AUC is over it: the gate must see RMIA's AUC.
    audit = _audit(_attack("loss", 0.55, 0.02), _attack("rmia", 0.65, 0.03), _attack("lira", 0.58, 0.08))
    assert audit.membership.attack == "lira"
    membership = _verdicts(audit)["membership"]
    assert not membership.passed
    checks = {check.metric: check for check in membership.checks}
    assert checks["candidate.membership_auc"].value == 0.65 and checks["candidate.membership_auc"].level == "fail"
    assert checks["candidate.membership_tpr_at_low_fpr"].value == 0.08  # a different attack: LiRA
    assert _verdicts()["membership"].passed


def test_gate_table_names_the_attack_and_the_run_that_gave_each_worst_case():
    from kdsec.gates import gate_sources

    audit = _audit(_attack("loss", 0.55, 0.02), _attack("rmia", 0.65, 0.03), _attack("lira", 0.58, 0.08))
    he = _he(_he_run("encrypted_input", "batched", 0.995, 1.0), _he_run("encrypted_model", "batched", 1.0, 0.993))
    sources = gate_sources(audit, he)
    assert sources == {"candidate.membership_auc": "rmia", "candidate.membership_tpr_at_low_fpr": "lira",
                       "he.agreement": "encrypted_input/batched", "he.agreement_with_model": "encrypted_model/batched"}
    verdicts = evaluate_gates(gate_metrics(0.98, 0.97, audit, he, AT_REST_PROVEN), GatesConfig(), sources=sources)
    checks = {check.metric: check for verdict in verdicts for check in verdict.checks}
    assert checks["candidate.membership_auc"].source == "rmia" and checks["he.agreement"].value == 0.995
    assert checks["he.agreement_with_model"].source == "encrypted_model/batched"
    assert checks["candidate.ece"].source is None


def test_a_nan_attack_result_fails_the_membership_gate_whatever_its_place():
    for nan_first in (True, False):
        attacks = [_attack("loss", math.nan, math.nan), _attack("rmia", 0.53, 0.02)]
        assert not _verdicts(_audit(*(attacks if nan_first else attacks[::-1])))["membership"].passed


def test_he_gate_fails_when_the_encrypted_run_disagrees_with_the_shipped_model():
    # Each run agrees with its own lowered program, but one of them not with the model that ships
    # (a lowering bug, e.g. BatchNorm folded wrongly, is invisible to the plaintext comparison).
    he = _he(_he_run("encrypted_input", "batched"), _he_run("encrypted_model", "batched", 1.0, 0.95))
    verdict = _verdicts(he=he)["he"]
    assert not verdict.passed
    assert [(c.metric, c.level) for c in verdict.checks if c.level == "fail"] == [("he.agreement_with_model", "fail")]
    assert _verdicts()["he"].passed


def test_he_gate_fails_when_a_run_had_no_model_predictions_to_compare_with():
    he = _he(_he_run("encrypted_input", "batched"), _he_run("encrypted_model", "batched", 1.0, math.nan))
    verdict = _verdicts(he=he)["he"]
    assert not verdict.passed and math.isnan(he.agreement_with_model)


def test_he_gate_fails_when_the_host_held_a_secret_key():
    he = _he(_he_run("encrypted_input", "batched"), _he_run("encrypted_model", "batched", secret=True))
    verdict = _verdicts(he=he)["he"]
    assert not verdict.passed
    assert [(c.metric, c.value) for c in verdict.checks if not c.passed] == [("he.host_had_no_secret_key", 0.0)]
