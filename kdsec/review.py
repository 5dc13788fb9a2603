"""Team review of registered versions: fetch and compare their reports, re-audit one alone.

Everything reads from the MLflow registry and the kd-pipeline run that produced a version
(its ``summary.json``, ``report/`` and ``config.yaml`` artifacts).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from kdsec import tracking
from kdsec.errors import DataError
from kdsec.fileio import strict_json, write_atomic
from kdsec.summary import Summary, read_summary


def fetch_report(model_name: str, version: str, destination: Path) -> dict:
    """Download a version's report (HTML, Markdown, audit.json) and summary into ``destination``."""
    run_id = tracking.version_pipeline_run(model_name, version)
    folder = destination / f"{model_name}-v{version}"
    report = tracking.download_run_artifact(run_id, "report", folder)
    summary = tracking.download_run_artifact(run_id, "summary.json", folder)
    return {"run_id": run_id, "html": report / "report.html", "markdown": report / "report.md",
            "audit": report / "audit.json", "summary": summary}


def version_state(model_name: str, version: str) -> dict:
    """What the registry says of a version beyond its report: its aliases and its review."""
    tags, aliases = tracking.version_tags_and_aliases(model_name, version)
    status = tags.get("review.status")
    if status and tags.get("review.reviewer"):
        status += f" by {tags['review.reviewer']}" + (f" ({tags['review.time']})" if tags.get("review.time") else "")
    try:
        history = json.loads(tags.get("review.history", "[]"))
    except ValueError:
        history = []
    return {"aliases": aliases, "history": history if isinstance(history, list) else [],
            "review": status or ("not required" if tags.get("gates") == "pass" else "none (gates failed)")}


def compare_configs(model_name: str, first: str, second: str, destination: Path) -> list[tuple[str, object, object]]:
    """The config keys whose values differ between the runs of two versions (their config.yaml)."""
    from kdsec.config import load_run_config

    trees = []
    for version in (first, second):
        folder = destination / f"{model_name}-v{version}"
        path = tracking.download_run_artifact(tracking.version_pipeline_run(model_name, version), "config.yaml", folder)
        trees.append(tracking.flatten(load_run_config(path).model_dump(mode="json")))
    left, right = trees
    return [(key, left.get(key), right.get(key)) for key in sorted(set(left) | set(right))
            if left.get(key) != right.get(key)]


def compare_versions(model_name: str, first: Summary, second: str, destination: Path) -> list[tuple[str, object, object]]:
    """Headline metrics of a version already read (``first``) and another, side by side
    (``Summary.headlines`` of their summary.json)."""
    left = first.headlines()
    right = read_summary(fetch_report(model_name, second, destination)["summary"]).headlines()
    return [(label, left[label], right[label]) for label in left]


def _worst_case_tags(attacks: dict) -> dict[str, str]:
    """The re-audit's membership figures as the gate reads them: the highest over attacks, and which."""
    from kdsec.gates import Metric, membership_worst_case

    worst = membership_worst_case(attacks)
    (auc_attack, auc), (tpr_attack, tpr) = worst[Metric.MEMBERSHIP_AUC], worst[Metric.MEMBERSHIP_TPR]
    return {"reaudit.membership_auc": f"{auc:.4f}", "reaudit.membership_auc_attack": auc_attack,
            "reaudit.membership_tpr_at_low_fpr": f"{tpr:.4f}", "reaudit.membership_tpr_attack": tpr_attack}


def reaudit(model_uri: str, out_root: Path, step: Callable[[str], None] = lambda message: None) -> dict:
    """Audit one registered version alone, on the data it was trained on (rebuilt from the run's
    config and checked against the version's data fingerprint); ``step`` hears of each stage."""
    from kdsec import roles
    from kdsec.audit.run import audit_models, extraction_audit, reference_checkpoints
    from kdsec.compress.quantize import DynamicQuantLinear, dequantized_copy, load_weights
    from kdsec.config import load_run_config
    from kdsec.data import prepare_data
    from kdsec.gates import AUDIT_GATES, audit_gate_metrics, evaluate_gates, worst_attacks

    tracking.connect()
    name, version = tracking.resolve_version(model_uri)
    run_id = tracking.version_pipeline_run(name, version)
    step(f"{name} version {version} (pipeline run {run_id}): reading its config and data")
    with tempfile.TemporaryDirectory() as scratch:
        config = load_run_config(tracking.download_run_artifact(run_id, "config.yaml", Path(scratch)))
    bundle = prepare_data(config.data)
    expected = tracking.version_tags_and_aliases(name, version)[0].get("data.fingerprint")
    if expected and expected != bundle.fingerprint:
        raise DataError(f"the data under data.root no longer matches version {version} (fingerprint "
                        f"{bundle.fingerprint}, the version was trained on {expected})")
    with tempfile.TemporaryDirectory() as scratch:  # weights only (safetensors): no stored model code runs
        model, spec, _ = load_weights(tracking.download_version_checkpoint(name, version, Path(scratch)))
    model.eval()
    int8 = any(isinstance(module, DynamicQuantLinear) for module in model.modules())
    surrogate = dequantized_copy(model, spec) if int8 else None
    step(f"data {bundle.name} (fingerprint {bundle.fingerprint}) "
         + ("matches the version's" if expected else "(the version records no fingerprint to check)") + "; weights loaded"
         + (" (int8; FGSM on its float copy)" if int8 else ""))
    references = {roles.STUDENTS: reference_checkpoints(config, bundle, roles.STUDENTS, step)[0]}  # cached, or trained now
    step("membership attacks (" + ("LOSS, RMIA, LiRA" if config.audit.reference_models else "LOSS") +
         "), calibration, robustness")
    (audit,) = audit_models({roles.CANDIDATE: model}, bundle, config, references, {roles.CANDIDATE: surrogate})
    step(f"knockoff extraction ({config.audit.extraction_queries} queries)")
    extraction = extraction_audit(config, bundle, model)
    step("gates, audit.json, version tags")
    verdicts = [v for v in evaluate_gates(audit_gate_metrics(audit, extraction), config.gates,
                                          sources=worst_attacks(audit.attacks)) if v.name in AUDIT_GATES]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = out_root / f"audit-{name}-v{version}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    document = {"model": name, "version": version, "model_uri": model_uri, "pipeline_run": run_id,
                "data_fingerprint": bundle.fingerprint, "time": stamp, "audit": asdict(audit),
                "extraction": [asdict(r) for r in extraction],
                "gates": {verdict.name: verdict.as_dict() for verdict in verdicts}}
    write_atomic(folder / "audit.json", strict_json(document))
    tracking.tag_version(name, version, {
        "reaudit.time": stamp, **_worst_case_tags(audit.attacks),
        "reaudit.verdict": "pass" if all(v.passed for v in verdicts) else "fail"})
    return {"path": folder / "audit.json", "audit": audit, "extraction": extraction, "verdicts": verdicts,
            "name": name, "version": version}


def audit_any(config, members: Path, checkpoint: Path | None, model_uri: str | None, arch: str | None,
              options: dict, out_root: Path, step: Callable[[str], None] = lambda message: None) -> dict:
    """Audit a model kdsec did not train (``kdsec audit --members``): a safetensors file or an
    MLflow model URI, on the rows of ``config``'s dataset that ``members`` lists; the audit
    gates; ``audit.json`` under ``out_root``. See ``kdsec.audit.external``."""
    import re

    from kdsec.audit.external import audit_external, checkpoint_in, load_audited, member_bundle
    from kdsec.errors import KdsecError
    from kdsec.gates import AUDIT_GATES, audit_gate_metrics, evaluate_gates, worst_attacks

    bundle, rows = member_bundle(config, members)
    step(f"data {bundle.name}: {len(rows)} member rows, {len(bundle.y_holdout)} non-members, "
         f"{len(bundle.y_val) + len(bundle.y_test)} population rows")
    if model_uri is None:
        model, spec = load_audited(checkpoint, bundle, arch, options)
    else:
        tracking.connect()
        with tempfile.TemporaryDirectory() as scratch:
            if model_uri.startswith("models:/"):
                name, version = tracking.resolve_version(model_uri)
                path = tracking.download_version_checkpoint(name, version, Path(scratch))
            else:
                import mlflow
                from mlflow.exceptions import MlflowException

                try:
                    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch))
                except (MlflowException, OSError) as exc:
                    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    raise KdsecError(f"the MLflow URI '{model_uri[:200]}' does not resolve: {reason}") from None
                path = folder if folder.is_file() else checkpoint_in(folder, model_uri)
            model, spec = load_audited(path, bundle, arch, options)
    step(f"model: {spec.arch} {spec.options or ''}")
    audit, extraction, non_members = audit_external(config, model, spec, bundle, step)
    verdicts = [v for v in evaluate_gates(audit_gate_metrics(audit, extraction), config.gates,
                                          sources=worst_attacks(audit.attacks)) if v.name in AUDIT_GATES]
    label = model_uri or checkpoint.name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = out_root / f"audit-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:60] or 'model'}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    document = {"model": label, "architecture": spec.arch, "data": bundle.name,
                "data_fingerprint": bundle.fingerprint, "members": int(len(rows)),
                "non_members_audited": int(non_members), "time": stamp, "audit": asdict(audit),
                "extraction": [asdict(r) for r in extraction],
                "gates": {verdict.name: verdict.as_dict() for verdict in verdicts}}
    write_atomic(folder / "audit.json", strict_json(document))
    return {"path": folder / "audit.json", "audit": audit, "extraction": extraction, "verdicts": verdicts,
            "name": label, "version": None}
