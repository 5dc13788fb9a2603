"""What the report says, decided once: both templates (HTML and Markdown) render this view, so
the banner, the warnings, the gate rows and the names a reviewer reads are the same in both."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdsec import roles
from kdsec.gates import Metric, worst_attacks
from kdsec.summary import Summary

# Human names for the metric keys gates read (the key stays on hover in HTML, in a column in Markdown).
METRIC_LABELS = {
    "candidate.test_accuracy": "Candidate test accuracy",
    "candidate.accuracy_drop_vs_teacher": "Accuracy drop vs the teacher",
    "candidate.membership_auc": "Membership-inference AUC (highest over attacks)",
    "candidate.membership_tpr_at_low_fpr": "Membership TPR at low FPR (highest over attacks)",
    "he.accuracy": "Test accuracy under encryption (batched, whole split)",
    "he.agreement": "Encrypted vs plaintext agreement (worst HE mode)",
    "he.agreement_with_model": "Encrypted vs shipped model agreement (worst HE mode)",
    "he.host_had_no_secret_key": "Host never held a secret key",
    "at_rest.roundtrip_exact": "Encrypted package opens bit-exact",
    "at_rest.tamper_rejected": "Flipped ciphertext byte rejected",
    "at_rest.wrong_key_rejected": "Wrong key rejected",
    "at_rest.manifest_tamper_rejected": "Edited manifest rejected",
    "at_rest.unsigned_rejected": "Stripped signature rejected",
    "at_rest.model_signature_verified": "OpenSSF model signature verifies",
    "candidate.extraction_fidelity_top1": "Knockoff copy fidelity (top-1 answers)",
    "candidate.ece": "Expected calibration error",
    "candidate.explanation_spearman": "Attribution agreement with the teacher (Spearman)",
    "dp_student.epsilon_within_accountant": "DP claim not refuted (one-run audit's ε lower bound ≤ accountant ε)",
}
GATE_LABELS = {"accuracy": "Accuracy", "membership": "Membership privacy", "he": "Homomorphic inference",
               "at_rest": "Encryption at rest", "extraction": "Model extraction", "calibration": "Calibration",
               "explanation": "Explanations", "dp_audit": "DP audit"}
LEVEL_WORDS = {"pass": "pass", "warn": "warn", "fail": "FAIL", "skipped": "skipped"}


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key) or key.split(".", 1)[-1].replace("_", " ").capitalize()


def gate_label(name: str) -> str:
    return GATE_LABELS.get(name, name.replace("_", " ").capitalize())


def number(value: float | None, digits: int = 4) -> str:
    return "missing" if value is None or value != value else f"{value:.{digits}f}"


@dataclass(frozen=True)
class ReportContext:
    """What the summary does not know: when the run started and where a reviewer opens it."""

    created: str = ""  # e.g. "2026-11-29 14:09 UTC"
    run_url: str | None = None  # the parent run in the MLflow UI
    version_url: str | None = None  # the registered version in the MLflow UI
    ui_note: str = ""  # how to reach that UI (e.g. "make mlflow-ui" for a local store)


@dataclass(frozen=True)
class GateRow:
    gate: str
    gate_label: str
    level: str  # pass | warn | fail | skipped
    metric: str
    label: str
    value: str
    fail_at: str
    warn_at: str
    warn_only: bool  # the fail threshold cannot be crossed: the check only ever warns


@dataclass(frozen=True)
class Banner:
    kind: str  # pass | warn | review | fail
    title: str
    lines: list[str]
    command: str | None = None  # the exact command a reviewer runs next


@dataclass
class ReportView:
    s: Summary
    context: ReportContext
    banner: Banner
    gate_rows: list[GateRow]
    warnings: list[GateRow]
    warn_only: list[str]  # gate labels whose every check can only warn
    candidate_role: str
    sections: list[tuple[str, str]] = field(default_factory=list)  # (anchor, title): the contents
    membership_rows: list[dict] = field(default_factory=list)
    per_class: dict = field(default_factory=dict)
    explanations: list[dict] = field(default_factory=list)


# The range of each gate metric (fractions in [0, 1] unless listed): a threshold at its end cannot fail.
METRIC_RANGES = {"candidate.explanation_spearman": (-1.0, 1.0)}


def _warn_only(metric: str, direction: str, threshold: float) -> bool:
    low, high = METRIC_RANGES.get(metric, (0.0, 1.0))
    return (direction == "<=" and threshold >= high) or (direction == ">=" and threshold <= low)


def gate_rows(summary: Summary) -> list[GateRow]:
    rows = []
    for name, gate in summary.gates.items():
        for check in gate.checks:
            warn = f"{check.direction} {check.warn_threshold:.4f}" if check.warn_threshold is not None else ""
            value = "— (stage off)" if check.level == "skipped" and check.value is None else number(check.value)
            value += f" ({check.source})" if check.source else ""
            rows.append(GateRow(name, gate_label(name), check.level, check.metric, metric_label(check.metric),
                                value, f"{check.direction} {check.threshold:.4f}", warn,
                                _warn_only(check.metric, check.direction, check.threshold)))
    return rows


def _explain(row: GateRow) -> str:
    threshold = row.warn_at if row.level == "warn" else row.fail_at
    return f"{row.gate_label}: {row.label} {row.value} (needs {threshold})"


def banner(summary: Summary, rows: list[GateRow]) -> Banner:
    registry = summary.registry
    model, version = registry.model, registry.version
    champion = f"'{registry.alias}' stays at version {registry.previous_champion or 'none (no champion yet)'}."
    warned = [_explain(row) for row in rows if row.level == "warn"]
    warning_line = [("Also past a warn level: " if not summary.passed else f"Passed with {len(warned)} warning(s): ")
                    + "; ".join(warned) + "."] if warned else []
    if not summary.passed:
        failed = [_explain(row) for row in rows if row.level == "fail"]
        return Banner("fail", f"FAILED — not promoted: {model} version {version} failed "
                      f"{len(summary.failed_gates)} gate(s)", ["Failed: " + "; ".join(failed) + ".", champion,
                                                                *warning_line])
    if registry.promoted:
        return Banner("warn" if warned else "pass",
                      f"PASSED — promoted: {model} version {version} is now '{registry.alias}'",
                      [*warning_line, f"It replaces version {registry.previous_champion}."
                       if registry.previous_champion else "It is the first champion."])
    if registry.awaiting_review:
        return Banner("review", f"PASSED — awaiting review: {model} version {version} holds "
                      f"'{registry.candidate_alias}', not yet '{registry.alias}'",
                      [*warning_line, f"Every gate passed; promotion waits for a reviewer "
                       f"(tracking.require_approval). {champion}",
                       "A reviewer other than the run's launcher approves (or rejects) with:"],
                      f'kdsec review approve {version} --comment "why"')
    if registry.superseded_by:
        return Banner("review", f"PASSED — not promoted: superseded by version {registry.superseded_by}",
                      [*warning_line, f"Version {registry.superseded_by} comes from a run that started later and "
                       f"passed too; it took the alias. {champion}"])
    return Banner("warn", f"PASSED — not promoted: {model} version {version}", [*warning_line, champion])


def once(role_keys, candidate_role: str) -> list[str]:
    """Roles with the candidate listed once: as the variant it was selected from, when that is there."""
    keys = list(role_keys)
    return [role for role in keys if not (role == roles.CANDIDATE and candidate_role in keys)]


def _membership_rows(summary: Summary, candidate_role: str) -> list[dict]:
    """Every model's attacks, the candidate once (as the variant it is, marked); ``worst`` names
    what each attack gives the membership gate's worst case ("highest AUC", "highest TPR")."""
    rows = []
    for role in once(summary.audit, candidate_role):
        audit = summary.audit[role]
        name = role + (" ★ candidate" if role in (candidate_role, roles.CANDIDATE) else "")
        worst = worst_attacks(audit.attacks)
        for index, (attack, result) in enumerate(audit.attacks.items()):
            marks = [word for metric, word in ((Metric.MEMBERSHIP_AUC, "highest AUC"),
                                               (Metric.MEMBERSHIP_TPR, "highest TPR")) if worst[metric] == attack]
            rows.append({"model": name if index == 0 else "", "role": role, "attack": attack, "r": result,
                         "worst": ", ".join(marks)})
    return rows


def _per_class(summary: Summary, candidate_role: str) -> dict:
    """Models as rows, classes as columns (ten columns fit; nine model columns did not)."""
    classes = list(summary.teacher_audit.per_class["accuracy"])
    models = {role: summary.audit[role].per_class["accuracy"] for role in once(summary.audit, candidate_role)}
    return {"classes": classes, "models": models}


METHOD_LABELS = {"integrated_gradients": "Integrated Gradients", "saliency": "Saliency"}


def explanation_rows(summary: Summary, candidate_role: str) -> list[dict]:
    """One row per model (the candidate once, as the variant it is): per method, agreement with
    the teacher and faithfulness, with their intervals."""
    found = summary.explanations
    if not found:
        return []
    rows = []
    for role in once(found.models, candidate_role):
        model = found.models[role]
        rows.append({"role": role, "candidate": role in (candidate_role, roles.CANDIDATE),
                     "attributed_with": model.attributed_with if model.attributed_with != role else "",
                     "accuracy": model.sample_accuracy, "random": model.random_deletion_auc,
                     "methods": model.methods})
    return rows


def build_view(summary: Summary, context: ReportContext | None = None) -> ReportView:
    rows = gate_rows(summary)
    candidate_role = roles.variant_role(summary.candidate.variant)
    by_gate: dict[str, list[GateRow]] = {}
    for row in rows:
        by_gate.setdefault(row.gate, []).append(row)
    warn_only = [checks[0].gate_label for checks in by_gate.values()
                 if all(row.warn_only or row.level == "skipped" for row in checks)
                 and any(row.warn_only for row in checks)]
    sections = [("gates", "Gates"), ("plots", "Plots"), ("models", "Data and models"),
                ("compression", "Compression"), ("encryption", "Encryption"),
                ("privacy", "Membership privacy"), ("extraction", "Model extraction"),
                ("trust", "Calibration, robustness, per-class accuracy"),
                *([("explanations", "Explanations")] if summary.explanations else []), ("lineage", "Lineage")]
    return ReportView(summary, context or ReportContext(), banner(summary, rows), rows,
                      [row for row in rows if row.level == "warn"], warn_only, candidate_role, sections,
                      _membership_rows(summary, candidate_role), _per_class(summary, candidate_role),
                      explanation_rows(summary, candidate_role))
