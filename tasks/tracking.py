"""Prefect tasks that record a run in MLflow (and Prefect artifacts): each retries on transient
failures of the tracking server, and none changes what the pipeline computes."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from kdsec import tracking
from kdsec.errors import KdsecError
from kdsec.report import ReportContext, render_report
from kdsec.compress.measure import VariantMetrics
from kdsec.config import PipelineConfig
from kdsec.data import DataBundle
from kdsec.fileio import write_atomic
from kdsec.gates import GateVerdict
from kdsec.summary import ReportPaths, Summary, write_json
from kdsec.sweep import MemberResult, comparison_table, pareto_plot
from kdsec.trainers import TrainedModel
from kdsec.tracking import Span

def _transient(task, task_run, state) -> bool:
    """Retry a tracking call that failed on the way (server down, timeout), never a refusal: a
    KdsecError says what is wrong, and the same call would be refused again."""
    try:
        state.result()
    except KdsecError:
        return False
    except Exception:  # noqa: BLE001 — anything else may be transient
        return True
    return True


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _transient}


@dataclass(frozen=True)
class PipelineRun:
    """The MLflow parent run of one pipeline run and the folder its outputs go to."""

    run_id: str
    out_dir: Path
    config_digest: str


def _flow_run_ended(tags: dict[str, str]) -> str | None:
    """Why a RUNNING MLflow run is over, judged by its Prefect flow run: a terminal state (e.g.
    Crashed, as a worker reports a killed process), or, for a flow run on this host whose process
    is gone, none yet — then it is marked Crashed here, so neither side stays RUNNING."""
    flow_run_id = tags.get("kdsec.prefect_flow_run_id")
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:  # another (e.g. temporary) Prefect server's run
            return None
        if state is not None and state.is_final():
            return f"its Prefect flow run {flow_run_id} is {state.name}"
        if tags.get("kdsec.host") == socket.gethostname() and not tracking.process_alive(tags.get("kdsec.pid", "")):
            client.set_flow_run_state(flow_run_id, Crashed(message="the flow-run process was killed"), force=True)
            return f"its process {tags.get('kdsec.pid')} is gone (Prefect flow run {flow_run_id} marked Crashed)"
    return None


@task(name="open-run", cache_policy=NO_CACHE)
def open_run_task(config: PipelineConfig, trigger: dict) -> PipelineRun:
    """Close runs whose process was killed, open this run's parent run (tagged with the config
    digest, dataset and Prefect flow run), create its output folder and record the config there
    and in MLflow. No retries: a retry would open a second parent run; if recording fails after
    the run is open, it is closed as FAILED before the error goes up."""
    logger = get_run_logger()
    experiment_id = tracking.configure(config.tracking.experiment)
    for run_id in tracking.close_abandoned_runs(experiment_id, _flow_run_ended):
        logger.warning("closed MLflow run %s as FAILED: its process was killed before it finished", run_id)
    digest = config.digest()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent = tracking.start_parent_run(experiment_id, f"kd-pipeline-{stamp}",
                                       {"kdsec.config_digest": digest, "kdsec.dataset": config.data.name,
                                        "kdsec.prefect_flow_run_id": str(prefect_runtime.flow_run.id or ""),
                                        "kdsec.trigger": f"{trigger['kind']} by {trigger['by'] or 'nobody known'}"})
    try:
        out_dir = Path(config.tracking.output_dir) / f"{stamp}-{parent[:8]}"
        out_dir.mkdir(parents=True, exist_ok=True)
        config_file = write_atomic(out_dir / "config.yaml", config.to_yaml())
        tracking.log_run_config(parent, config_file, config.model_dump(mode="json"))
    except BaseException:
        tracking.finish_run(parent, False)
        raise
    return PipelineRun(parent, out_dir, digest)


@task(name="track-data", cache_policy=NO_CACHE, **IO_RETRIES)
def track_data_task(parent_run_id: str, bundle: DataBundle, span: Span | None = None) -> None:
    """The training data as an MLflow dataset (fingerprint, split sizes). Which rows were members
    (``splits.npz``) stays in the run folder, 0600: never in the artifact store, where everyone who
    may read the experiment would learn who trained the model."""
    dataset = mlflow.data.from_numpy(features=bundle.x_train.reshape(len(bundle.x_train), -1),
                                     targets=bundle.y_train, name=f"{bundle.name}-train",
                                     digest=bundle.fingerprint)
    sizes = {f"split.{name}": count for name, count in bundle.sizes().items()}
    with tracking.stage_run(parent_run_id, "data", span):
        mlflow.log_input(dataset, context="training")
        mlflow.log_params({"data.fingerprint": bundle.fingerprint, **sizes})
    tracking.log_dataset(parent_run_id, dataset, context="training")
    client = MlflowClient()
    client.set_tag(parent_run_id, "data.fingerprint", bundle.fingerprint)
    for key, value in sizes.items():
        client.log_metric(parent_run_id, key, float(value))


@task(name="track-model", cache_policy=NO_CACHE, **IO_RETRIES)
def track_model_task(parent_run_id: str, model: TrainedModel, cache: str = "miss", span: Span | None = None) -> None:
    with tracking.stage_run(parent_run_id, model.role, span):
        mlflow.set_tag("kdsec.cache", cache)
        for record in model.history:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
        mlflow.log_metrics(model.metrics())
        mlflow.log_artifact(model.checkpoint, artifact_path="checkpoints")


@task(name="track-stage", cache_policy=NO_CACHE, **IO_RETRIES)
def track_stage_task(parent_run_id: str, stage: str, metrics: dict[str, float], payload: dict,
                     files: list[Path] = (), span: Span | None = None) -> None:
    """A nested run for ``stage`` (its real start and end with ``span``): its metrics (NaN left
    out), ``<stage>.json`` and its files."""
    with tracking.stage_run(parent_run_id, stage, span) as run:
        mlflow.log_metrics({str(key): float(value) for key, value in metrics.items() if np.isfinite(value)})
        tracking.log_dict_artifact(payload, f"{stage}.json", run.info.run_id)
        for path in files:
            mlflow.log_artifact(str(path))


@task(name="track-sweep", cache_policy=NO_CACHE, **IO_RETRIES)
def track_sweep_task(parent_run_id: str, config: PipelineConfig, members: list[tuple[TrainedModel, MemberResult]],
                     best: MemberResult, out_dir: Path, span: Span | None = None) -> dict:
    """A ``sweep`` stage run with one nested run per member (its settings, curves and sizes);
    the comparison table and the accuracy-vs-size Pareto plot go to the parent run."""
    results = [result for _, result in members]
    table = comparison_table(results, best)
    (out_dir / "sweep").mkdir(parents=True, exist_ok=True)
    table_path = write_atomic(out_dir / "sweep" / "comparison.md", table)
    csv_path = write_atomic(out_dir / "sweep" / "comparison.csv",
                            pd.DataFrame([result.row() for result in results]).to_csv(index=False))
    plot_path = pareto_plot(results, best, out_dir / "sweep" / "pareto.png")
    with tracking.stage_run(parent_run_id, "sweep", span) as sweep_run:
        sweep_id = sweep_run.info.run_id
        mlflow.log_params({"sweep.members": len(results), "sweep.task_runner": config.sweep.task_runner,
                           "sweep.best": best.member.name, "sweep.selected_by": "val_accuracy"})
    for trained, result in members:
        with tracking.stage_run(sweep_id, result.member.name):
            mlflow.log_params({"distill.temperature": result.member.temperature, "distill.alpha": result.member.alpha,
                               "distill.loss": result.member.loss, "student.width_multiplier": result.member.width})
            for record in trained.history:
                mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
            mlflow.log_metrics({"val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                                "params": result.params, "size_bytes": result.size_bytes, "flops": result.flops,
                                "train_seconds": result.train_seconds})
            mlflow.set_tag("sweep.best", str(result.member.name == best.member.name).lower())
    client = MlflowClient()
    for path in (table_path, csv_path, plot_path):
        client.log_artifact(parent_run_id, str(path), artifact_path="sweep")
    client.set_tag(parent_run_id, "sweep.best", best.member.name)
    create_table_artifact(key="kd-sweep", table=[result.row() for result in results],
                          description=f"distillation sweep: best {best.member.name} by validation accuracy")
    return {"run_id": sweep_id, "table": str(table_path), "csv": str(csv_path), "plot": str(plot_path)}


@task(name="track-gates", cache_policy=NO_CACHE, **IO_RETRIES)
def track_gates_task(parent_run_id: str, metrics: dict[str, float], verdicts: list[GateVerdict]) -> None:
    tracking.log_gates(parent_run_id, metrics, verdicts)


@task(name="claim-request", cache_policy=NO_CACHE, **IO_RETRIES)
def claim_request_task(request_run_id: str, config_path: str | None, overrides: list[str] | None) -> dict:
    """Claim the authenticated run request behind this deployed run (once; a retry finds its own claim)."""
    tracking.connect()
    return tracking.claim_run_request(request_run_id, str(prefect_runtime.flow_run.id or ""), config_path, overrides)


def run_trigger() -> dict:
    """Who started a run that came without a request: the deployment's schedule for a run Prefect's
    scheduler made (``auto_scheduled``; its API can also make such runs on demand, so the flow counts
    one as the schedule's only with the parameters deployments/prefect.yaml pins), nobody known for
    another deployment run, else whoever runs the flow here (the tracking server's identity, or the
    local login)."""
    flow_run_id = prefect_runtime.flow_run.id
    if flow_run_id and prefect_runtime.deployment.id:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(flow_run_id)
        except Exception as exc:  # noqa: BLE001 — Prefect's own errors: unreachable API
            raise KdsecError(f"Prefect could not say how flow run {flow_run_id} started: "
                             f"{tracking.first_line(exc)}") from None
        if flow_run.auto_scheduled:
            return {"kind": "schedule", "by": f"schedule:{prefect_runtime.deployment.name}"}
        return {"kind": "deployment", "by": None}
    return {"kind": "direct", "by": tracking.identity().name}


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(config: PipelineConfig, parent_run_id: str, bundle: DataBundle, candidate: VariantMetrics,
                  verdicts: list[GateVerdict], extra_tags: dict[str, str]) -> dict:
    """Register the candidate with its gate tags; no alias moves before its verdict is attested."""
    from kdsec.compress.candidates import variant_format

    serving = {"input_scale": bundle.input_scale, "class_names": bundle.class_names,
               "normalization": bundle.normalization, "example": bundle.raw_rows(bundle.x_test[:5])}
    return tracking.register_version(config.tracking, parent_run_id, Path(candidate.checkpoint),
                                     variant_format(candidate), serving, verdicts, extra_tags)


@task(name="publish-audit", cache_policy=NO_CACHE, **IO_RETRIES)
def publish_audit_task(parent_run_id: str, summary: Summary, out_dir: Path) -> str:
    """Write ``audit.json`` and log it to the parent run (``report/``); return its SHA-256, which
    the verdict attestation names."""
    audit_path = write_json(summary.audit_document(), out_dir / "audit.json")
    MlflowClient().log_artifact(parent_run_id, str(audit_path), artifact_path="report")
    return hashlib.sha256(audit_path.read_bytes()).hexdigest()


@task(name="attest-and-promote", cache_policy=NO_CACHE, **IO_RETRIES)
def promote_task(config: PipelineConfig, registered: dict, verdicts: list[GateVerdict], trigger: dict,
                 audit_sha256: str) -> dict:
    """Sign the verdict on the registered version with the pipeline's signing key, then move the
    alias only if every gate passed (or mark the version for review)."""
    from kdsec.crypto.attestation import trusted_key
    from kdsec.crypto.keys import load_or_create_signer

    encrypt = config.encrypt
    signer = load_or_create_signer(encrypt.signing_key_env, encrypt.signing_key_file)
    trusted = trusted_key(encrypt.signing_key_env, encrypt.signing_key_file)
    return tracking.promote(config.tracking, registered, verdicts, signer, trigger, audit_sha256, trusted)


@task(name="publish-report", cache_policy=NO_CACHE, **IO_RETRIES)
def report_task(parent_run_id: str, summary: Summary, out_dir: Path) -> Summary:
    """Render the report, write ``summary.json``, log both to the parent run (tagged ``gates`` = the
    verdict) and to Prefect's artifacts (``audit.json`` went before, see ``publish_audit_task``)."""
    client = MlflowClient()
    run = client.get_run(parent_run_id)
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    context = ReportContext(created=started, **tracking.ui_links(parent_run_id, summary.registry.model,
                                                                 summary.registry.version))
    report = render_report(summary, out_dir, context)
    summary = summary.model_copy(update={"report": ReportPaths(markdown=str(report.markdown), html=str(report.html))})
    summary_path = summary.write(out_dir / "summary.json")
    client.log_artifact(parent_run_id, str(summary_path))
    for path in (report.markdown, report.html, *report.plots.values()):
        client.log_artifact(parent_run_id, str(path), artifact_path="report")
    client.set_tag(parent_run_id, "gates", summary.verdict)
    # Runs told apart in the runs list: dataset, candidate and verdict in the name.
    name = run.info.run_name or ""
    client.update_run(parent_run_id, name=name.replace(
        "kd-pipeline", f"{summary.data.name}-{summary.candidate.variant}-{summary.verdict.upper()}", 1))
    create_markdown_artifact(key="kd-audit-report", markdown=report.markdown.read_text(),
                             description=f"kdsec audit report ({summary.verdict})")
    create_table_artifact(key="kd-gates", table=[
        {"gate": name, "verdict": gate.verdict} for name, gate in summary.gates.items()])
    return summary.model_copy(update={"summary_path": str(summary_path)})

