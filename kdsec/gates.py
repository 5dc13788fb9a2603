"""Gates are data: (gate, metric, threshold, direction), evaluated in one place, reported in one table."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum

from kdsec.config import GatesConfig, PipelineConfig

OPERATORS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class GateCheck:
    gate: Gate
    metric: Metric
    threshold_key: str  # the config key that sets the fail threshold
    direction: str  # ">=" or "<="
    warn_key: str | None = None  # the config key of the warn threshold, if the check has one
    optional: bool = False  # a missing metric (stage switched off) skips the check instead of failing it


@dataclass(frozen=True)
class CheckResult:
    gate: str
    metric: str
    value: float | None
    threshold: float
    direction: str
    passed: bool
    level: str = "pass"  # pass | warn | fail | skipped
    warn_threshold: float | None = None
    source: str | None = None  # what gave a worst-case value: the attack, the HE mode/path run


@dataclass(frozen=True)
class GateVerdict:
    name: str
    passed: bool
    checks: list[CheckResult]

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def warnings(self) -> list[str]:
        return [check.metric for check in self.checks if check.level == "warn"]

    @property
    def level(self) -> str:
        return "fail" if not self.passed else ("warn" if self.warnings else "pass")

    def as_dict(self) -> dict:
        """The gate as ``summary.json`` and ``audit.json`` record it."""
        return {"verdict": self.verdict, "level": self.level, "warnings": self.warnings,
                "checks": [asdict(check) for check in self.checks]}


class Gate(StrEnum):
    """The gates, by the name they have in config, tags (``gate.<name>``), summary and report."""

    ACCURACY = "accuracy"
    MEMBERSHIP = "membership"
    HE = "he"
    AT_REST = "at_rest"
    EXTRACTION = "extraction"
    CALIBRATION = "calibration"
    EXPLANATION = "explanation"
    DP_AUDIT = "dp_audit"


class Metric(StrEnum):
    """The flat metric names gates read (also the parent run's MLflow metrics)."""

    TEST_ACCURACY = "candidate.test_accuracy"
    ACCURACY_DROP = "candidate.accuracy_drop_vs_teacher"
    MEMBERSHIP_AUC = "candidate.membership_auc"
    MEMBERSHIP_TPR = "candidate.membership_tpr_at_low_fpr"
    HE_ACCURACY = "he.accuracy"
    HE_AGREEMENT = "he.agreement"
    HE_AGREEMENT_WITH_MODEL = "he.agreement_with_model"
    HE_HOST_HAD_NO_SECRET_KEY = "he.host_had_no_secret_key"
    ROUNDTRIP_EXACT = "at_rest.roundtrip_exact"
    TAMPER_REJECTED = "at_rest.tamper_rejected"
    WRONG_KEY_REJECTED = "at_rest.wrong_key_rejected"
    MANIFEST_TAMPER_REJECTED = "at_rest.manifest_tamper_rejected"
    UNSIGNED_REJECTED = "at_rest.unsigned_rejected"
    MODEL_SIGNATURE_VERIFIED = "at_rest.model_signature_verified"
    EXTRACTION_FIDELITY = "candidate.extraction_fidelity_top1"
    ECE = "candidate.ece"
    EXPLANATION_SPEARMAN = "candidate.explanation_spearman"
    # 1.0 while the one-run audit's ε lower bound (95 %) stays within the DP student's accountant ε
    DP_AUDIT_HOLDS = "dp_student.epsilon_within_accountant"


# Each at_rest check is the AtRestResult field of the same name (after the "at_rest." prefix).
_AT_REST = (Metric.ROUNDTRIP_EXACT, Metric.TAMPER_REJECTED, Metric.WRONG_KEY_REJECTED,
            Metric.MANIFEST_TAMPER_REJECTED, Metric.UNSIGNED_REJECTED, Metric.MODEL_SIGNATURE_VERIFIED)

# Boolean checks (1.0 = proven) have no tunable threshold: they read this key, which is always 1.0.
REQUIRED = "required"

GATE_CHECKS = (
    GateCheck(Gate.ACCURACY, Metric.TEST_ACCURACY, "min_accuracy", ">="),
    GateCheck(Gate.ACCURACY, Metric.ACCURACY_DROP, "max_drop", "<="),
    GateCheck(Gate.MEMBERSHIP, Metric.MEMBERSHIP_AUC, "max_auc", "<=", "warn_auc"),
    GateCheck(Gate.MEMBERSHIP, Metric.MEMBERSHIP_TPR, "max_tpr", "<=", "warn_tpr"),
    # accuracy as evaluated under encryption (the batched run on the test split) holds the same floor
    GateCheck(Gate.HE, Metric.HE_ACCURACY, "min_accuracy", ">=", optional=True),
    GateCheck(Gate.HE, Metric.HE_AGREEMENT, "min_he_agreement", ">="),
    GateCheck(Gate.HE, Metric.HE_AGREEMENT_WITH_MODEL, "min_he_agreement_with_model", ">="),
    GateCheck(Gate.HE, Metric.HE_HOST_HAD_NO_SECRET_KEY, REQUIRED, ">="),
    *(GateCheck(Gate.AT_REST, metric, REQUIRED, ">=") for metric in _AT_REST),
    GateCheck(Gate.EXTRACTION, Metric.EXTRACTION_FIDELITY, "max_extraction_fidelity", "<=",
              "warn_extraction_fidelity", optional=True),
    GateCheck(Gate.CALIBRATION, Metric.ECE, "max_ece", "<=", "warn_ece"),
    GateCheck(Gate.EXPLANATION, Metric.EXPLANATION_SPEARMAN, "min_explanation_spearman", ">=",
              "warn_explanation_spearman"),
    # A refuted DP claim (the lower bound over the accountant's ε) fails; no DP run, no check.
    GateCheck(Gate.DP_AUDIT, Metric.DP_AUDIT_HOLDS, REQUIRED, ">=", optional=True),
)

# The gates an audit alone decides (``kdsec audit`` re-runs them on a registered version).
AUDIT_GATES = (Gate.MEMBERSHIP, Gate.EXTRACTION, Gate.CALIBRATION)


# The membership gate reads each metric at its worst over every attack, possibly from different
# attacks: a stronger attack on one metric cannot hide behind the attack that leads on the other.
MEMBERSHIP_WORST_CASE = {Metric.MEMBERSHIP_AUC: "auc", Metric.MEMBERSHIP_TPR: "tpr_at_low_fpr"}


def worst_attacks(attacks: Mapping[str, object]) -> dict[str, str]:
    """Per membership metric, the name of the attack with its highest value. ``attacks``: name ->
    a result with ``auc`` and ``tpr_at_low_fpr`` (a ``MembershipResult`` or its summary)."""
    def highest(field: str) -> str:
        def key(name: str) -> tuple[bool, float]:
            value = getattr(attacks[name], field)
            return value != value, value  # a NaN counts as the highest: the gate fails on it

        return max(attacks, key=key)

    return {metric: highest(field) for metric, field in MEMBERSHIP_WORST_CASE.items()}


def membership_worst_case(attacks: Mapping[str, object]) -> dict[str, tuple[str, float]]:
    """Per membership metric, the attack at its worst over ``attacks`` and that value."""
    worst = worst_attacks(attacks)
    return {metric: (worst[metric], float(getattr(attacks[worst[metric]], field)))
            for metric, field in MEMBERSHIP_WORST_CASE.items()}


def audit_gate_metrics(candidate_audit, extraction: list = ()) -> dict[str, float]:
    """The audit's share of the gate metrics (membership, extraction, calibration) of a
    ``ModelAudit`` and the extraction results against the same model; membership at its worst
    over the candidate's attacks."""
    served = [result.fidelity for result in extraction if result.defense == "top1"]
    return {
        **({Metric.EXTRACTION_FIDELITY: served[0]} if served else {}),
        Metric.ECE: candidate_audit.calibration.ece,
        **{metric: value for metric, (_, value) in membership_worst_case(candidate_audit.attacks).items()},
    }


def he_gate_metrics(he) -> dict[str, float]:
    """The he gate's metrics of an ``HEResult``: agreement with the lowered program's plaintext and
    with the shipped model's own predictions, each the minimum over every mode and path run, and
    whether the host never held a secret key (1.0) — a gated check, not only a sentence in the report."""
    return {**({Metric.HE_ACCURACY: he.accuracy} if he.accuracy is not None else {}),
            Metric.HE_AGREEMENT: he.agreement, Metric.HE_AGREEMENT_WITH_MODEL: he.agreement_with_model,
            Metric.HE_HOST_HAD_NO_SECRET_KEY: float(not he.host_had_secret_key)}


def gate_metrics(teacher_accuracy: float, candidate_accuracy: float, candidate_audit, he, at_rest,
                 extraction: list = (), explanations=None, dp_audits: list = ()) -> dict[str, float]:
    """Every metric a gate reads, from the run's results (``he``: an ``HEResult``; ``at_rest``: an
    ``AtRestResult``; ``explanations``: an ``ExplainResult``, None when ``explain.enabled`` is
    false). A switched-off stage leaves its metric out: its gate is skipped."""
    return {
        **audit_gate_metrics(candidate_audit, extraction),
        Metric.TEST_ACCURACY: candidate_accuracy,
        Metric.ACCURACY_DROP: teacher_accuracy - candidate_accuracy,
        **(he_gate_metrics(he) if he.enabled else {}),
        **{metric: float(getattr(at_rest, metric.removeprefix("at_rest."))) for metric in _AT_REST},
        **({Metric.EXPLANATION_SPEARMAN: explanations.candidate_spearman} if explanations is not None else {}),
        # only an audit that could refute the claim decides (a refuted one always fails)
        **({Metric.DP_AUDIT_HOLDS: float(not any(dp.refuted for dp in dp_audits))}
           if any(dp.conclusive or dp.refuted for dp in dp_audits) else {}),
    }


def gate_sources(candidate_audit, he) -> dict[str, str]:
    """Which attack gave each worst-case membership value, and which HE run (``mode/path``) the
    lowest agreements; the gate table shows them next to the values."""
    sources = dict(worst_attacks(candidate_audit.attacks))
    for metric, measure in ((Metric.HE_AGREEMENT, "agreement"),
                            (Metric.HE_AGREEMENT_WITH_MODEL, "agreement_with_model")):
        if (run := he.worst(measure)) is not None:
            sources[metric] = f"{run.mode}/{run.path}"
    if he.accuracy is not None:
        sources[Metric.HE_ACCURACY] = "encrypted_input/batched"
    return sources


def switched_off_gates(config: PipelineConfig) -> frozenset[str]:
    """Gates whose stage the config turns off: skipped, not failed, and the report says so."""
    off = {Gate.HE: not config.encrypt.he.enabled, Gate.EXPLANATION: not config.explain.enabled}
    return frozenset(gate for gate, switched_off in off.items() if switched_off)


def _threshold(gates: GatesConfig, key: str) -> float:
    return 1.0 if key == REQUIRED else float(getattr(gates, key))


def _check(check: GateCheck, value: float | None, gates: GatesConfig, off: bool = False,
           source: str | None = None) -> CheckResult:
    threshold = _threshold(gates, check.threshold_key)
    warn = _threshold(gates, check.warn_key) if check.warn_key else None
    compare = OPERATORS[check.direction]
    if off or (value is None and check.optional):
        level = "skipped"
    elif value is None or value != value or not compare(value, threshold):
        level = "fail"
    elif warn is not None and not compare(value, warn):
        level = "warn"
    else:
        level = "pass"
    return CheckResult(check.gate, check.metric, None if value is None else float(value), threshold,
                       check.direction, level != "fail", level, warn, source)


def evaluate_gates(metrics: dict[str, float], gates: GatesConfig, switched_off: frozenset[str] = frozenset(),
                   sources: dict[str, str] | None = None) -> list[GateVerdict]:
    """Evaluate every check against flat ``metrics``: a missing or NaN metric fails its check
    (unless the check is optional and its stage was switched off); past a warn threshold the
    check passes with level "warn". The gates named in ``switched_off`` (their stage was turned
    off in config, e.g. ``he`` with ``encrypt.he.enabled: false``) are skipped, never failed.
    ``sources`` (``gate_sources``) name what gave each worst-case value."""
    verdicts: dict[str, list[CheckResult]] = {}
    for check in GATE_CHECKS:
        verdicts.setdefault(check.gate, []).append(
            _check(check, metrics.get(check.metric), gates, check.gate in switched_off,
                   (sources or {}).get(check.metric)))
    return [GateVerdict(name, all(c.passed for c in checks), checks) for name, checks in verdicts.items()]


def all_passed(verdicts: list[GateVerdict]) -> bool:
    return all(verdict.passed for verdict in verdicts)
