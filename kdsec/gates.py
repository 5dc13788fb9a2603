"""Gates are data: (gate, metric, threshold, direction), evaluated in one place, reported in one table."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from kdsec.config import GatesConfig

OPERATORS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class GateCheck:
    gate: str
    metric: str
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


GATE_CHECKS = (
    GateCheck("accuracy", "candidate.test_accuracy", "min_accuracy", ">="),
    GateCheck("accuracy", "candidate.accuracy_drop_vs_teacher", "max_drop", "<="),
    GateCheck("membership", "candidate.membership_auc", "max_auc", "<=", "warn_auc"),
    GateCheck("membership", "candidate.membership_tpr_at_low_fpr", "max_tpr", "<=", "warn_tpr"),
    GateCheck("he", "he.agreement", "min_he_agreement", ">="),
    GateCheck("at_rest", "at_rest.roundtrip_exact", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.tamper_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.wrong_key_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.manifest_tamper_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.unsigned_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.model_signature_verified", "at_rest_required", ">="),
    GateCheck("extraction", "candidate.extraction_fidelity_top1", "max_extraction_fidelity", "<=",
              "warn_extraction_fidelity", optional=True),
    GateCheck("calibration", "candidate.ece", "max_ece", "<=", "warn_ece"),
)


def _threshold(gates: GatesConfig, key: str) -> float:
    # at_rest checks are booleans (1.0 = proven); they have no tunable threshold.
    return 1.0 if key == "at_rest_required" else float(getattr(gates, key))


def _check(check: GateCheck, value: float | None, gates: GatesConfig, off: bool = False) -> CheckResult:
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
                       check.direction, level != "fail", level, warn)


def evaluate_gates(metrics: dict[str, float], gates: GatesConfig,
                   switched_off: frozenset[str] = frozenset()) -> list[GateVerdict]:
    """Evaluate every check against flat ``metrics``: a missing or NaN metric fails its check
    (unless the check is optional and its stage was switched off); past a warn threshold the
    check passes with level "warn". The gates named in ``switched_off`` (their stage was turned
    off in config, e.g. ``he`` with ``encrypt.he.enabled: false``) are skipped, never failed."""
    verdicts: dict[str, list[CheckResult]] = {}
    for check in GATE_CHECKS:
        verdicts.setdefault(check.gate, []).append(
            _check(check, metrics.get(check.metric), gates, check.gate in switched_off))
    return [GateVerdict(name, all(c.passed for c in checks), checks) for name, checks in verdicts.items()]


def all_passed(verdicts: list[GateVerdict]) -> bool:
    return all(verdict.passed for verdict in verdicts)
