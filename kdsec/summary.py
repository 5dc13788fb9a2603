"""``summary.json``: every headline metric and every gate's value, threshold and verdict.

The schema is documented in the README ("summary.json"); ``SCHEMA_VERSION`` changes with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kdsec.compress import VariantMetrics
from kdsec.crypto.package import AtRestResult
from kdsec.crypto.he import HEResult
from kdsec.data import DataBundle
from kdsec.fileio import write_atomic
from kdsec.gates import GateVerdict
from kdsec.stages import SELECTION_RULES, ModelAudit, TrainedModel

SCHEMA_VERSION = 7


def audit_gate_metrics(candidate_audit: ModelAudit, extraction: list = ()) -> dict[str, float]:
    """The audit's share of the gate metrics (membership, extraction, calibration)."""
    served = [result.fidelity for result in extraction if result.defense == "top1"]
    return {
        **({"candidate.extraction_fidelity_top1": served[0]} if served else {}),
        "candidate.ece": candidate_audit.calibration.ece,
        "candidate.membership_auc": candidate_audit.membership.auc,
        "candidate.membership_tpr_at_low_fpr": candidate_audit.membership.tpr_at_low_fpr,
    }


def gate_metrics(teacher: TrainedModel, candidate: VariantMetrics, candidate_audit: ModelAudit, he: HEResult,
                 at_rest: AtRestResult, extraction: list = ()) -> dict[str, float]:
    """The flat metric names that gates refer to (see kdsec.gates.GATE_CHECKS)."""
    return {
        **audit_gate_metrics(candidate_audit, extraction),
        "candidate.test_accuracy": candidate.test_accuracy,
        "candidate.accuracy_drop_vs_teacher": teacher.test_accuracy - candidate.test_accuracy,
        **({"he.agreement": he.agreement} if he.enabled else {}),  # off: the he gate is skipped
        "at_rest.roundtrip_exact": float(at_rest.roundtrip_exact),
        "at_rest.tamper_rejected": float(at_rest.tamper_rejected),
        "at_rest.wrong_key_rejected": float(at_rest.wrong_key_rejected),
        "at_rest.manifest_tamper_rejected": float(at_rest.manifest_tamper_rejected),
        "at_rest.unsigned_rejected": float(at_rest.unsigned_rejected),
        "at_rest.model_signature_verified": float(at_rest.model_signature_verified),
    }


def teacher_leakage(audits: list[ModelAudit], bundle: DataBundle) -> dict:
    """Membership in the teacher's training split, inferred from each student's outputs."""
    rows = {audit.role: {"attack": audit.teacher_leakage.attack, "auc": audit.teacher_leakage.auc,
                         "tpr_at_low_fpr": audit.teacher_leakage.tpr_at_low_fpr,
                         "auc_ci": audit.teacher_leakage.auc_ci, "trained_on": audit.member_split,
                         "own_membership_auc": audit.membership.auc}
            for audit in audits if audit.teacher_leakage is not None}
    return {"transfer_split_size": int(len(bundle.y_transfer)), "students": rows}


def privacy_defense(models: dict[str, TrainedModel], audits: dict[str, ModelAudit]) -> dict:
    """The DP-SGD student next to the scratch student it replaces: ε spent, accuracy, leakage."""
    private = models.get("dp_student")
    if private is None or "dp_student" not in audits:
        return {"enabled": False}
    baseline, audit = audits["scratch_student"], audits["dp_student"]
    return {"enabled": True, **private.privacy, "test_accuracy": private.test_accuracy,
            "baseline": "scratch_student", "baseline_test_accuracy": models["scratch_student"].test_accuracy,
            "accuracy_change": private.test_accuracy - models["scratch_student"].test_accuracy,
            "membership_auc": audit.membership.auc, "baseline_membership_auc": baseline.membership.auc,
            "membership_auc_change": audit.membership.auc - baseline.membership.auc,
            "membership_tpr_at_low_fpr": audit.membership.tpr_at_low_fpr,
            "baseline_membership_tpr_at_low_fpr": baseline.membership.tpr_at_low_fpr,
            "attack": audit.membership.attack}


def build_summary(*, run_id: str, config_digest: str, code_version: str, bundle: DataBundle,
                  models: list[TrainedModel], teacher_cache: str, variants: list[VariantMetrics],
                  candidate: VariantMetrics, selection: str, at_rest: AtRestResult, he: HEResult,
                  audits: list[ModelAudit], verdicts: list[GateVerdict], registry: dict,
                  output_dir: Path, audit_seconds: float = float("nan"), extraction: list = (),
                  sweep: dict | None = None, distill: dict | None = None, caches: dict | None = None) -> dict:
    by_role = {model.role: model for model in models}
    failed = [verdict.name for verdict in verdicts if not verdict.passed]
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "config_digest": config_digest,
        "code_version": code_version,
        "verdict": "fail" if failed else "pass",
        "promoted": bool(registry.get("promoted")),
        "failed_gates": failed,
        "data": {"name": bundle.name, "fingerprint": bundle.fingerprint, "splits": bundle.sizes(),
                 "input_shape": list(bundle.input_shape), "classes": bundle.num_classes},
        "models": {model.role: {"test_accuracy": model.test_accuracy, "val_accuracy": model.val_accuracy,
                                "params": model.params, "best_epoch": model.best_epoch,
                                "epochs_run": model.epochs_run, "train_seconds": model.train_seconds,
                                "checkpoint": model.checkpoint,
                                **({"privacy": model.privacy} if model.privacy else {})} for model in models},
        "teacher_cache": teacher_cache,
        "cache": caches or {"teacher": teacher_cache},
        "distillation_gain": by_role["kd_student"].test_accuracy - by_role["scratch_student"].test_accuracy,
        "distillation": distill or {},
        "sweep": sweep,
        "variants": [variant.as_dict() for variant in variants],
        "candidate": {"variant": candidate.name, "rule": SELECTION_RULES[selection],
                      "test_accuracy": candidate.test_accuracy, "size_bytes": candidate.size_bytes},
        "at_rest": asdict(at_rest),
        "he": he.as_dict(),
        "audit": {audit.role: asdict(audit) for audit in audits},
        "extraction": [asdict(result) for result in extraction],
        "teacher_leakage": teacher_leakage(audits, bundle),
        "privacy_defense": privacy_defense(by_role, {audit.role: audit for audit in audits}),
        "audit_timing": {"seconds": audit_seconds, "teacher_train_seconds": by_role["teacher"].train_seconds,
                         "ratio_to_teacher_training": audit_seconds / max(by_role["teacher"].train_seconds, 1e-9)},
        "gates": {verdict.name: {"verdict": verdict.verdict, "level": verdict.level, "warnings": verdict.warnings,
                                 "checks": [asdict(check) for check in verdict.checks]} for verdict in verdicts},
        "warnings": [metric for verdict in verdicts for metric in verdict.warnings],
        "registry": registry,
        "output_dir": str(output_dir),
    }


def audit_document(summary: dict) -> dict:
    """``audit.json``: the review team's machine-readable audit, from the same data as the report."""
    return {"schema_version": SCHEMA_VERSION, "run_id": summary["run_id"], "verdict": summary["verdict"],
            "lineage": {"data": summary["data"], "config_digest": summary["config_digest"],
                        "code_version": summary["code_version"]},
            "gates": summary["gates"], "models": summary["audit"], "extraction": summary["extraction"],
            "teacher_leakage": summary["teacher_leakage"], "privacy_defense": summary["privacy_defense"],
            "timing": summary["audit_timing"],
            "candidate": summary["candidate"], "at_rest": summary["at_rest"], "he": summary["he"]}


def write_summary(summary: dict, path: Path) -> Path:
    return write_atomic(path, json.dumps(summary, indent=2, default=str))
