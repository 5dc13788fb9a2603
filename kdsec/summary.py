"""``summary.json``: every headline metric and every gate's value, threshold and verdict.

``Summary`` is the one typed owner of that contract: the pipeline builds it, the CLI, the review
commands, the report templates and the tests read it by attribute, and ``summary.json`` /
``audit.json`` are written from it. The schema is documented in the README ("summary.json");
``SCHEMA_VERSION`` changes with it. Sections type the fields their readers use and keep the rest
of their detail (``extra="allow"``), so the written JSON holds everything the run measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

from kdsec import roles
from kdsec.errors import DataError
from kdsec.fileio import read_bounded, strict_json, write_atomic
from kdsec.gates import CheckResult, Metric, membership_worst_case

if TYPE_CHECKING:  # the model above is read without torch; only building a summary needs these
    from kdsec.audit.run import AuditOutcome, ModelAudit
    from kdsec.compress.measure import VariantMetrics
    from kdsec.he import HEResult
    from kdsec.crypto.package import AtRestResult
    from kdsec.data import DataBundle
    from kdsec.explain import ExplainResult
    from kdsec.gates import GateVerdict
    from kdsec.trainers import TrainedModel

SCHEMA_VERSION = 9  # 9: explanations (see the README's migration notes)
SUMMARY_LIMIT = 64 * 1024 * 1024  # a summary.json read back (e.g. a registered version's) is at most this


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A section whose typed fields are what readers use; the rest of its detail is kept."""

    model_config = ConfigDict(extra="allow")


class GateSummary(_Exact):
    verdict: str  # pass | fail
    level: str  # pass | warn | fail
    warnings: list[str]
    checks: list[CheckResult]  # kdsec.gates' own record of a check


class DataSummary(_Exact):
    name: str
    fingerprint: str
    splits: dict[str, int]
    input_shape: list[int]
    classes: int


class ModelSummary(_Exact):
    test_accuracy: float
    val_accuracy: float
    params: int
    best_epoch: int
    epochs_run: int
    train_seconds: float
    checkpoint: str
    privacy: dict[str, Any] | None = None  # DP-SGD accounting: only the DP student has the key

    @model_serializer(mode="wrap")
    def _privacy_only_where_spent(self, handler) -> dict:
        data = handler(self)
        if data.get("privacy") is None:
            data.pop("privacy", None)
        return data


class CandidateSummary(_Exact):
    variant: str
    rule: str
    test_accuracy: float  # what the accuracy gate reads
    size_bytes: int
    val_accuracy: float | None = None  # what the candidate was chosen by; absent before it was


class MembershipSummary(_Open):
    attack: str
    auc: float
    tpr_at_low_fpr: float
    low_fpr: float


class CalibrationSummary(_Open):
    ece: float
    bin_confidence: list[float | None]  # NaN in memory for an empty bin; null in the written JSON
    bin_accuracy: list[float | None]


class ModelAuditSummary(_Open):
    role: str
    test_accuracy: float
    membership: MembershipSummary
    calibration: CalibrationSummary
    per_class: dict[str, Any]
    attacks: dict[str, MembershipSummary]


class HESummary(_Open):
    enabled: bool
    agreement: float | None
    accuracy: float | None = None  # under encryption: the batched run over the whole test split
    samples: int
    ms_per_sample: float | None
    single_sample_ms: float | None
    host_had_secret_key: bool
    runs: list[dict[str, Any]]


class AtRestSummary(_Open):
    package_path: str
    kek_id: str
    signer_key_id: str


Interval = tuple[float | None, float | None]  # a bootstrap 95% interval; null when not computed


class ExplanationScores(_Open):
    """One model under one attribution method (``kdsec.explain.MethodScores``)."""

    method: str
    spearman: float | None  # agreement with the teacher; None for the teacher itself
    spearman_ci: Interval
    top_k_overlap: float | None
    top_k_overlap_ci: Interval
    deletion_auc: float
    deletion_auc_ci: Interval
    faithfulness_gap: float
    faithfulness_gap_ci: Interval
    deletion_curve: list[float]


class ModelExplanationSummary(_Open):
    role: str
    attributed_with: str  # the model's own role, or "<role> (float source)" for int8 variants
    sample_accuracy: float
    random_deletion_auc: float
    random_deletion_auc_ci: Interval
    random_deletion_curve: list[float]
    methods: dict[str, ExplanationScores]


class ExplanationsSummary(_Open):
    """The explanation trust check (``kdsec.explain.ExplainResult``)."""

    method: str  # the primary method: what the explanation gate reads
    methods: list[str]
    candidate_role: str
    sample: dict[str, Any]  # size, seed, indices, misclassified, figure_rows (test-split indices)
    models: dict[str, ModelExplanationSummary]  # per role, ``candidate`` included
    fractions: list[float]  # share of pixels removed at each point of the deletion curves
    top_k_percent: float
    figure: str | None
    seconds: float
    target: str
    baseline: str
    he_note: str

    @property
    def candidate(self) -> ModelExplanationSummary:
        return self.models[roles.CANDIDATE]


class RegistrySummary(_Exact):
    # Versions are strings (as a tracking server returns them); a local store's ints, as
    # schema 7 and earlier recorded them, are read as strings.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    model: str
    version: str
    model_uri: str
    alias: str
    promoted: bool
    awaiting_review: bool = False
    candidate_alias: str | None = None
    superseded_by: str | None = None
    previous_champion: str | None = None
    champion: str | None = None


class AuditTiming(_Exact):
    seconds: float
    teacher_train_seconds: float
    ratio_to_teacher_training: float


class ReportPaths(_Exact):
    markdown: str
    html: str


class Summary(_Exact):
    schema_version: int
    run_id: str
    config_digest: str
    code_version: str
    verdict: str  # pass | fail
    promoted: bool
    failed_gates: list[str]
    data: DataSummary
    models: dict[str, ModelSummary]
    teacher_cache: str
    cache: dict[str, Any] = {}  # absent from summaries written before the cache counts
    distillation_gain: float
    distillation: dict[str, Any]
    sweep: dict[str, Any] | None
    variants: list[dict[str, Any]]
    candidate: CandidateSummary
    at_rest: AtRestSummary
    he: HESummary
    audit: dict[str, ModelAuditSummary]
    extraction: list[dict[str, Any]]
    teacher_leakage: dict[str, Any]
    privacy_defense: dict[str, Any]
    audit_timing: AuditTiming
    explanations: ExplanationsSummary | None = None  # None with explain.enabled false, and before schema 9
    gates: dict[str, GateSummary]
    warnings: list[str]
    registry: RegistrySummary
    output_dir: str
    report: ReportPaths | None = None  # set once the report is rendered
    summary_path: str | None = None  # where summary.json was written (not inside the file itself)

    @property
    def passed(self) -> bool:
        """Every gate passed: promoted, awaiting review, or superseded by a later passing run."""
        return self.verdict == "pass"

    @property
    def candidate_audit(self) -> ModelAuditSummary:
        return self.audit[roles.CANDIDATE]

    @property
    def teacher_audit(self) -> ModelAuditSummary:
        return self.audit[roles.TEACHER]

    def extraction_fidelity(self) -> float | None:
        return next((row["fidelity"] for row in self.extraction if row["defense"] == "top1"), None)

    def explanation_agreement(self) -> float | None:
        """The candidate's Spearman agreement with the teacher's attributions (the explanation gate's metric)."""
        if self.explanations is None:
            return None
        return self.explanations.candidate.methods[self.explanations.method].spearman

    def headlines(self) -> dict[str, object]:
        """The figures a reviewer compares across versions (``kdsec report --compare``)."""
        candidate = self.candidate_audit
        worst = membership_worst_case(candidate.attacks)
        (auc_attack, auc), (tpr_attack, tpr) = worst[Metric.MEMBERSHIP_AUC], worst[Metric.MEMBERSHIP_TPR]
        return {
            "verdict": self.verdict,
            "warnings": ", ".join(self.warnings) or "none",
            "candidate variant": self.candidate.variant,
            "candidate test accuracy": self.candidate.test_accuracy,
            "candidate bytes": self.candidate.size_bytes,
            "teacher test accuracy": self.models[roles.TEACHER].test_accuracy,
            "distillation gain": self.distillation_gain,
            "membership AUC (highest over attacks)": auc,
            "membership AUC: attack": auc_attack,
            "membership TPR @ low FPR (highest over attacks)": tpr,
            "membership TPR: attack": tpr_attack,
            "candidate ECE": candidate.calibration.ece,
            "explanation agreement (Spearman)": self.explanation_agreement(),
            "extraction fidelity (top-1)": self.extraction_fidelity(),
            "HE agreement (min over modes)": self.he.agreement,
            "HE batched ms/sample": self.he.ms_per_sample,
            "data fingerprint": self.data.fingerprint,
            "config digest": self.config_digest,
        }

    def audit_document(self) -> dict:
        """``audit.json``: the review team's machine-readable audit, from the same data as the report."""
        data = self.model_dump(mode="python")  # NaN stays NaN, as in summary.json
        return {"schema_version": SCHEMA_VERSION, "run_id": self.run_id, "verdict": self.verdict,
                "lineage": {"data": data["data"], "config_digest": self.config_digest,
                            "code_version": self.code_version},
                "gates": data["gates"], "models": data["audit"], "extraction": data["extraction"],
                "teacher_leakage": data["teacher_leakage"], "privacy_defense": data["privacy_defense"],
                "timing": data["audit_timing"], "candidate": data["candidate"], "at_rest": data["at_rest"],
                "he": data["he"], "explanations": data["explanations"]}

    def write(self, path: Path) -> Path:
        """``summary.json``, strict JSON (without ``summary_path``, which says where this very file is)."""
        return write_json(self.model_dump(mode="python", exclude={"summary_path"}), path)


def write_json(document: dict, path: Path) -> Path:
    return write_atomic(path, strict_json(document))


def read_summary(path: Path) -> Summary:
    """A ``summary.json`` read back (bounded, validated): a malformed one is a one-line DataError."""
    data = read_bounded(path, SUMMARY_LIMIT, "summary.json", error=DataError)
    try:
        return Summary.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise DataError(f"'{path}' is not a kdsec summary.json of schema {SCHEMA_VERSION}: "
                        f"{' '.join(first[:3])}") from None


def teacher_leakage(audits: list[ModelAudit], bundle: DataBundle) -> dict:
    """Membership in the teacher's training split, inferred from each student's outputs."""
    rows = {audit.role: {"attack": audit.teacher_leakage.attack, "auc": audit.teacher_leakage.auc,
                         "tpr_at_low_fpr": audit.teacher_leakage.tpr_at_low_fpr,
                         "auc_ci": audit.teacher_leakage.auc_ci, "trained_on": audit.member_split,
                         "own_membership_auc": audit.membership.auc}
            for audit in audits if audit.teacher_leakage is not None}
    return {"transfer_split_size": int(len(bundle.y_transfer)), "students": rows}


def privacy_defense(models: dict[str, TrainedModel], audits: dict[str, ModelAudit], dp_audits: list = ()) -> dict:
    """The DP-SGD student next to the scratch student it replaces: ε spent, accuracy, leakage;
    and the one-run audit of its ε (``dp_audits``)."""
    private = models.get(roles.DP_STUDENT)
    if private is None or roles.DP_STUDENT not in audits:
        return {"enabled": False}
    baseline, audit = audits[roles.SCRATCH_STUDENT], audits[roles.DP_STUDENT]
    scratch = models[roles.SCRATCH_STUDENT]
    return {"enabled": True, **private.privacy, "test_accuracy": private.test_accuracy,
            "baseline": roles.SCRATCH_STUDENT, "baseline_test_accuracy": scratch.test_accuracy,
            "accuracy_change": private.test_accuracy - scratch.test_accuracy,
            "membership_auc": audit.membership.auc, "baseline_membership_auc": baseline.membership.auc,
            "membership_auc_change": audit.membership.auc - baseline.membership.auc,
            "membership_tpr_at_low_fpr": audit.membership.tpr_at_low_fpr,
            "baseline_membership_tpr_at_low_fpr": baseline.membership.tpr_at_low_fpr,
            "attack": audit.membership.attack, "dp_audit": [dp.as_dict() for dp in dp_audits]}


def build_summary(*, run_id: str, config_digest: str, code_version: str, bundle: DataBundle,
                  models: list[TrainedModel], variants: list[VariantMetrics],
                  candidate: VariantMetrics, selection: str, at_rest: AtRestResult, he: HEResult,
                  audit: AuditOutcome, verdicts: list[GateVerdict], registry: dict, output_dir: Path,
                  caches: dict, sweep: dict | None = None, distill: dict | None = None,
                  explanations: ExplainResult | None = None) -> Summary:
    from kdsec.compress.candidates import SELECTION_RULES

    by_role = {model.role: model for model in models}
    failed = [verdict.name for verdict in verdicts if not verdict.passed]
    return Summary(
        schema_version=SCHEMA_VERSION, run_id=run_id, config_digest=config_digest, code_version=code_version,
        verdict="fail" if failed else "pass", promoted=bool(registry.get("promoted")), failed_gates=failed,
        data={"name": bundle.name, "fingerprint": bundle.fingerprint, "splits": bundle.sizes(),
              "input_shape": list(bundle.input_shape), "classes": bundle.num_classes},
        models={model.role: {"test_accuracy": model.test_accuracy, "val_accuracy": model.val_accuracy,
                             "params": model.params, "best_epoch": model.best_epoch,
                             "epochs_run": model.epochs_run, "train_seconds": model.train_seconds,
                             "checkpoint": model.checkpoint,
                             **({"privacy": model.privacy} if model.privacy else {})} for model in models},
        teacher_cache=caches["teacher"],
        cache=caches,
        distillation_gain=(by_role[roles.KD_STUDENT].test_accuracy
                           - by_role[roles.SCRATCH_STUDENT].test_accuracy),
        distillation=distill or {},
        sweep=sweep,
        variants=[variant.as_dict() for variant in variants],
        candidate={"variant": candidate.name, "rule": SELECTION_RULES[selection],
                   "test_accuracy": candidate.test_accuracy, "size_bytes": candidate.size_bytes,
                   "val_accuracy": candidate.val_accuracy},
        at_rest=asdict(at_rest),
        he=he.as_dict(),
        audit={model_audit.role: asdict(model_audit) for model_audit in audit.audits},
        extraction=[asdict(result) for result in audit.extraction],
        teacher_leakage=teacher_leakage(audit.audits, bundle),
        privacy_defense=privacy_defense(by_role, audit.by_role, audit.dp_audits),
        audit_timing={"seconds": audit.seconds, "teacher_train_seconds": audit.teacher_train_seconds,
                      "ratio_to_teacher_training": audit.ratio_to_teacher_training},
        explanations=explanations.as_dict() if explanations is not None else None,
        gates={verdict.name: verdict.as_dict() for verdict in verdicts},
        warnings=[metric for verdict in verdicts for metric in verdict.warnings],
        registry=registry,
        output_dir=str(output_dir),
    )
