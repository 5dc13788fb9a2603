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
    threshold_key: str  # the config key that sets the threshold
    direction: str  # ">=" or "<="


@dataclass(frozen=True)
class CheckResult:
    gate: str
    metric: str
    value: float | None
    threshold: float
    direction: str
    passed: bool


@dataclass(frozen=True)
class GateVerdict:
    name: str
    passed: bool
    checks: list[CheckResult]

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


GATE_CHECKS = (
    GateCheck("accuracy", "candidate.test_accuracy", "min_accuracy", ">="),
    GateCheck("accuracy", "candidate.accuracy_drop_vs_teacher", "max_drop", "<="),
    GateCheck("membership", "candidate.membership_auc", "max_auc", "<="),
    GateCheck("membership", "candidate.membership_tpr_at_low_fpr", "max_tpr", "<="),
    GateCheck("he", "he.agreement", "min_he_agreement", ">="),
    GateCheck("at_rest", "at_rest.roundtrip_exact", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.tamper_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.wrong_key_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.manifest_tamper_rejected", "at_rest_required", ">="),
    GateCheck("at_rest", "at_rest.unsigned_rejected", "at_rest_required", ">="),
)


def _threshold(gates: GatesConfig, key: str) -> float:
    # at_rest checks are booleans (1.0 = proven); they have no tunable threshold.
    return 1.0 if key == "at_rest_required" else float(getattr(gates, key))


def evaluate_gates(metrics: dict[str, float], gates: GatesConfig) -> list[GateVerdict]:
    """Evaluate every check against flat ``metrics``; a missing or NaN metric fails its check."""
    verdicts: dict[str, list[CheckResult]] = {}
    for check in GATE_CHECKS:
        value = metrics.get(check.metric)
        threshold = _threshold(gates, check.threshold_key)
        passed = value is not None and value == value and OPERATORS[check.direction](value, threshold)
        verdicts.setdefault(check.gate, []).append(
            CheckResult(check.gate, check.metric, None if value is None else float(value), threshold,
                        check.direction, bool(passed)))
    return [GateVerdict(name, all(c.passed for c in checks), checks) for name, checks in verdicts.items()]


def all_passed(verdicts: list[GateVerdict]) -> bool:
    return all(verdict.passed for verdict in verdicts)
