"""Team review of registered versions: fetch and compare their reports, re-audit one alone.

Everything reads from the MLflow registry and the kd-pipeline run that produced a version
(its ``summary.json``, ``report/`` and ``config.yaml`` artifacts).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from kdsec import tracking
from kdsec.errors import DataError
from kdsec.fileio import write_atomic

HEADLINES = (
    ("verdict", lambda s: s["verdict"]),
    ("warnings", lambda s: ", ".join(s.get("warnings", [])) or "none"),
    ("candidate variant", lambda s: s["candidate"]["variant"]),
    ("candidate test accuracy", lambda s: s["candidate"]["test_accuracy"]),
    ("candidate bytes", lambda s: s["candidate"]["size_bytes"]),
    ("teacher test accuracy", lambda s: s["models"]["teacher"]["test_accuracy"]),
    ("distillation gain", lambda s: s["distillation_gain"]),
    ("membership attack (strongest)", lambda s: s["audit"]["candidate"]["membership"]["attack"]),
    ("membership AUC", lambda s: s["audit"]["candidate"]["membership"]["auc"]),
    ("membership TPR @ low FPR", lambda s: s["audit"]["candidate"]["membership"]["tpr_at_low_fpr"]),
    ("candidate ECE", lambda s: s["audit"]["candidate"]["calibration"]["ece"]),
    ("extraction fidelity (top-1)", lambda s: next((r["fidelity"] for r in s.get("extraction", [])
                                                   if r["defense"] == "top1"), None)),
    ("HE agreement (min over modes)", lambda s: s["he"]["agreement"]),
    ("HE batched ms/sample", lambda s: s["he"]["ms_per_sample"]),
    ("data fingerprint", lambda s: s["data"]["fingerprint"]),
    ("config digest", lambda s: s["config_digest"]),
)


def fetch_report(model_name: str, version: str, destination: Path) -> dict:
    """Download a version's report (HTML, Markdown, audit.json) and summary into ``destination``."""
    run_id = tracking.version_pipeline_run(model_name, version)
    folder = destination / f"{model_name}-v{version}"
    report = tracking.download_run_artifact(run_id, "report", folder)
    summary = tracking.download_run_artifact(run_id, "summary.json", folder)
    return {"run_id": run_id, "html": report / "report.html", "markdown": report / "report.md",
            "audit": report / "audit.json", "summary": summary}


def _headline(summary: dict) -> dict[str, object]:
    values = {}
    for label, read in HEADLINES:
        try:
            values[label] = read(summary)
        except (KeyError, TypeError, StopIteration):
            values[label] = None
    return values


def compare_versions(model_name: str, first: str, second: str, destination: Path) -> list[tuple[str, object, object]]:
    """Headline metrics of two versions side by side (read from their summary.json)."""
    left = json.loads(fetch_report(model_name, first, destination)["summary"].read_text())
    right = json.loads(fetch_report(model_name, second, destination)["summary"].read_text())
    a, b = _headline(left), _headline(right)
    return [(label, a[label], b[label]) for label, _ in HEADLINES]


def reaudit(model_uri: str, out_root: Path) -> dict:
    """Audit one registered version alone, on the data it was trained on (rebuilt from the run's
    config and checked against the version's data fingerprint)."""
    import mlflow

    from kdsec import stages
    from kdsec.compress.quantize import dequantized_copy, load_weights
    from kdsec.config import load_config
    from kdsec.data import prepare_data
    from kdsec.compress.quantize import DynamicQuantLinear
    from kdsec.gates import evaluate_gates
    from kdsec.summary import audit_gate_metrics

    mlflow.set_tracking_uri(tracking.tracking_uri())
    name, version = tracking.resolve_version(model_uri)
    run_id = tracking.version_pipeline_run(name, version)
    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(tracking.download_run_artifact(run_id, "config.yaml", Path(scratch)), [])
    bundle = prepare_data(config.data)
    expected = mlflow.MlflowClient().get_model_version(name, version).tags.get("data.fingerprint")
    if expected and expected != bundle.fingerprint:
        raise DataError(f"the data under data.root no longer matches version {version} (fingerprint "
                        f"{bundle.fingerprint}, the version was trained on {expected})")
    with tempfile.TemporaryDirectory() as scratch:  # weights only (safetensors): no stored model code runs
        model, spec, _ = load_weights(tracking.download_version_checkpoint(name, version, Path(scratch)))
    model.eval()
    int8 = any(isinstance(module, DynamicQuantLinear) for module in model.modules())
    surrogate = dequantized_copy(model, spec) if int8 else None
    references = []
    for index in range(config.audit.reference_models):  # the pipeline's cached ones, or trained now
        path = stages.reference_checkpoint(config, bundle, "student", index)
        if not path.is_file():
            stages.train_reference_model(config, bundle, "student", index, path)
        references.append(str(path))
    (audit,) = stages.audit_models({"candidate": model}, bundle, config, {"student": references},
                                   {"candidate": surrogate})
    extraction = stages.extraction_audit(config, bundle, model)
    verdicts = [v for v in evaluate_gates(audit_gate_metrics(audit, extraction), config.gates)
                if v.name in ("membership", "extraction", "calibration")]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = out_root / f"audit-{name}-v{version}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    document = {"model": name, "version": version, "model_uri": model_uri, "pipeline_run": run_id,
                "data_fingerprint": bundle.fingerprint, "time": stamp, "audit": asdict(audit),
                "extraction": [asdict(r) for r in extraction],
                "gates": {v.name: {"verdict": v.verdict, "level": v.level,
                                   "checks": [asdict(c) for c in v.checks]} for v in verdicts}}
    write_atomic(folder / "audit.json", json.dumps(document, indent=2, default=str))
    client = mlflow.MlflowClient()
    for key, value in {"reaudit.time": stamp, "reaudit.attack": audit.membership.attack,
                       "reaudit.membership_auc": f"{audit.membership.auc:.4f}",
                       "reaudit.membership_tpr_at_low_fpr": f"{audit.membership.tpr_at_low_fpr:.4f}",
                       "reaudit.verdict": "pass" if all(v.passed for v in verdicts) else "fail"}.items():
        client.set_model_version_tag(name, version, key, value)
    return {"path": folder / "audit.json", "audit": audit, "extraction": extraction, "verdicts": verdicts,
            "name": name, "version": version}
