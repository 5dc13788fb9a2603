"""Thin Prefect tasks around kdsec's stages: retries on I/O, caching of the teacher, tracking.

Training tasks are pure (no tracking inside) so that a cached result is identical to a fresh
one; ``track_*`` tasks log to MLflow and retry on transient failures of the tracking server.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from kdsec import stages, tracking
from kdsec.audit.report import render_report
from kdsec.compress import VariantMetrics
from kdsec.config import PipelineConfig
from kdsec.data import DataBundle, prepare_data
from kdsec.fileio import write_atomic
from kdsec.gates import GateVerdict
from kdsec.sweep import MemberResult, SweepMember, comparison_table, pareto_plot
from kdsec.summary import audit_document, write_summary

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data_task(config: PipelineConfig) -> DataBundle:
    return prepare_data(config.data)


def _teacher_key(context: TaskRunContext, parameters: dict) -> str:
    config: PipelineConfig = parameters["config"]
    return stages.teacher_cache_key(parameters["bundle"].fingerprint, config.teacher, config.seed)


@task(name="train-teacher", cache_key_fn=_teacher_key, persist_result=True)
def train_teacher_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> stages.TrainedModel:
    return stages.train_teacher(config, bundle, checkpoint)


@task(name="train-scratch-student", cache_policy=NO_CACHE)
def train_scratch_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> stages.TrainedModel:
    return stages.train_scratch_student(config, bundle, checkpoint)


def _signals_key(context: TaskRunContext, parameters: dict) -> str:
    return Path(parameters["path"]).stem  # stages.teacher_signals_path names the file by the key


@task(name="teacher-signals", cache_key_fn=_signals_key, persist_result=True)
def teacher_signals_task(config: PipelineConfig, bundle: DataBundle, teacher: stages.TrainedModel,
                         path: Path) -> str:
    """The teacher's logits (+ feature targets) on the transfer split, computed once, stored as
    safetensors and cached: every student of the run (and of later runs) reads the file."""
    return stages.store_teacher_signals(config, bundle, teacher, path)


@task(name="distill-student", cache_policy=NO_CACHE)
def distill_task(config: PipelineConfig, bundle: DataBundle, teacher: stages.TrainedModel,
                 checkpoint: Path, signals: str | None = None) -> stages.TrainedModel:
    return stages.distill_student(config, bundle, teacher, checkpoint, signals)


@task(name="distill-member", cache_policy=NO_CACHE)
def distill_member_task(config: PipelineConfig, bundle: DataBundle, member: SweepMember, signals: str,
                        checkpoint: Path, torch_threads: int = 0) -> tuple[stages.TrainedModel, MemberResult]:
    return stages.distill_member(config, bundle, member, signals, checkpoint, torch_threads)


@task(name="track-sweep", cache_policy=NO_CACHE, **IO_RETRIES)
def track_sweep_task(parent_run_id: str, config: PipelineConfig, members: list[tuple[stages.TrainedModel, MemberResult]],
                     best: MemberResult, out_dir: Path) -> dict:
    """A ``sweep`` stage run with one nested run per member (its settings, curves and sizes);
    the comparison table and the accuracy-vs-size Pareto plot go to the parent run."""
    results = [result for _, result in members]
    table = comparison_table(results, best)
    (out_dir / "sweep").mkdir(parents=True, exist_ok=True)
    table_path = out_dir / "sweep" / "comparison.md"
    write_atomic(table_path, table)
    csv_path = write_atomic(out_dir / "sweep" / "comparison.csv",
                            pd.DataFrame([result.row() for result in results]).to_csv(index=False))
    plot_path = pareto_plot(results, best, out_dir / "sweep" / "pareto.png")
    with tracking.stage_run(parent_run_id, "sweep") as sweep_run:
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


@task(name="train-dp-student", cache_policy=NO_CACHE)
def train_dp_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> stages.TrainedModel:
    return stages.train_dp_student(config, bundle, checkpoint)


@task(name="compress", cache_policy=NO_CACHE)
def compress_task(config: PipelineConfig, bundle: DataBundle, student: stages.TrainedModel,
                  teacher: stages.TrainedModel, out_dir: Path, signals: str | None = None) -> list[VariantMetrics]:
    return stages.compress_student(config.compress, bundle, student, config.student.train, config.seed, out_dir,
                                   stages.distiller_for(config, bundle, teacher, signals).objective,
                                   config.distill.transfer_set)


@task(name="encrypt-at-rest", cache_policy=NO_CACHE)
def at_rest_task(config: PipelineConfig, candidate: VariantMetrics, destination: Path, version: str,
                 metadata: dict):
    return stages.protect_at_rest(config, candidate, destination, version, metadata)


@task(name="homomorphic-inference", cache_policy=NO_CACHE)
def he_task(config: PipelineConfig, bundle: DataBundle, candidate: VariantMetrics, package_dir: Path):
    return stages.homomorphic_inference(config, bundle, candidate, package_dir)


def _reference_key(context: TaskRunContext, parameters: dict) -> str:
    config: PipelineConfig = parameters["config"]
    spec, train = stages.reference_plan(config, parameters["bundle"])[parameters["group"]]
    return stages.reference_cache_key(parameters["bundle"].fingerprint, spec, train, parameters["index"], config.seed)


@task(name="train-reference", cache_key_fn=_reference_key, persist_result=True)
def train_reference_task(config: PipelineConfig, bundle: DataBundle, group: str, index: int,
                         checkpoint: Path) -> str:
    return stages.train_reference_model(config, bundle, group, index, checkpoint)


@task(name="audit", cache_policy=NO_CACHE)
def audit_task(config: PipelineConfig, bundle: DataBundle, models: dict, references: dict[str, list[str]],
               surrogates: dict) -> list[stages.ModelAudit]:
    return stages.audit_models(models, bundle, config, references, surrogates)


@task(name="extraction-attack", cache_policy=NO_CACHE)
def extraction_task(config: PipelineConfig, bundle: DataBundle, victim):
    return stages.extraction_audit(config, bundle, victim)


# --- tracking -------------------------------------------------------------------------------


@task(name="track-data", cache_policy=NO_CACHE, **IO_RETRIES)
def track_data_task(parent_run_id: str, bundle: DataBundle, data_file: Path) -> None:
    dataset = mlflow.data.from_numpy(features=bundle.x_train.reshape(len(bundle.x_train), -1),
                                     targets=bundle.y_train, name=f"{bundle.name}-train",
                                     digest=bundle.fingerprint)
    sizes = {f"split.{name}": count for name, count in bundle.sizes().items()}
    with tracking.stage_run(parent_run_id, "data"):
        mlflow.log_input(dataset, context="training")
        mlflow.log_params({"data.fingerprint": bundle.fingerprint, **sizes})
        mlflow.log_artifact(str(data_file))
    tracking.log_dataset(parent_run_id, dataset, context="training")
    client = MlflowClient()
    client.set_tag(parent_run_id, "data.fingerprint", bundle.fingerprint)
    for key, value in sizes.items():
        client.log_metric(parent_run_id, key, float(value))


@task(name="track-model", cache_policy=NO_CACHE, **IO_RETRIES)
def track_model_task(parent_run_id: str, model: stages.TrainedModel, cache: str = "miss") -> None:
    with tracking.stage_run(parent_run_id, model.role):
        mlflow.set_tag("kdsec.cache", cache)
        for record in model.history:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
        mlflow.log_metrics({"test_accuracy": model.test_accuracy, "best_val_accuracy": model.val_accuracy,
                            "params": model.params, "train_seconds": model.train_seconds})
        mlflow.log_artifact(model.checkpoint, artifact_path="checkpoints")


@task(name="track-stage", cache_policy=NO_CACHE, **IO_RETRIES)
def track_stage_task(parent_run_id: str, stage: str, metrics: dict[str, float], payload: dict,
                     files: list[Path] = ()) -> None:
    with tracking.stage_run(parent_run_id, stage) as run:
        mlflow.log_metrics({key: float(value) for key, value in metrics.items() if np.isfinite(value)})
        tracking.log_dict_artifact(payload, f"{stage}.json", run.info.run_id)
        for path in files:
            mlflow.log_artifact(str(path))


@task(name="register-and-promote", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(config: PipelineConfig, parent_run_id: str, bundle: DataBundle, candidate: VariantMetrics,
                  verdicts: list[GateVerdict], extra_tags: dict[str, str]) -> dict:
    """Log the candidate as a pyfunc model, register a version with its gate tags, and move the
    alias only if every gate passed. The previous champion is recorded for the report."""
    settings = config.tracking
    previous = tracking.champion_version(settings.registered_model, settings.alias)
    with tracking.stage_run(parent_run_id, "register") as run:
        model_uri = tracking.log_student_model(Path(candidate.checkpoint), stages.variant_format(candidate),
                                               bundle.input_scale, bundle.class_names, bundle.normalization)
        version = tracking.register_candidate(model_uri, settings.registered_model, verdicts,
                                              run.info.run_id, extra_tags)
    passed = all(verdict.passed for verdict in verdicts)
    holder = None
    if passed and settings.require_approval:
        holder = tracking.mark_candidate(settings.registered_model, version, settings.candidate_alias)
    elif passed:
        holder = tracking.settle_alias(settings.registered_model, settings.alias,
                                       lambda v: v.tags.get("gates") == "pass")
    superseded_by = holder if holder not in (None, str(version)) else None
    if superseded_by:
        tracking.note_superseded(settings.registered_model, version, superseded_by)
    awaiting_review = passed and settings.require_approval and superseded_by is None
    promoted = passed and not settings.require_approval and superseded_by is None
    return {"model": settings.registered_model, "version": version, "model_uri": model_uri,
            "alias": settings.alias, "promoted": promoted, "awaiting_review": awaiting_review,
            "candidate_alias": settings.candidate_alias if awaiting_review else None,
            "superseded_by": superseded_by, "previous_champion": previous,
            "champion": version if promoted else previous}


@task(name="publish-report", cache_policy=NO_CACHE, **IO_RETRIES)
def report_task(parent_run_id: str, summary: dict, out_dir: Path) -> dict:
    report = render_report(summary, out_dir)
    summary = {**summary, "report": {"markdown": str(report.markdown), "html": str(report.html)}}
    summary_path = write_summary(summary, out_dir / "summary.json")
    audit_path = write_summary(audit_document(summary), out_dir / "audit.json")
    client = MlflowClient()
    client.log_artifact(parent_run_id, str(summary_path))
    client.log_artifact(parent_run_id, str(audit_path), artifact_path="report")
    for path in (report.markdown, report.html, *report.plots.values()):
        client.log_artifact(parent_run_id, str(path), artifact_path="report")
    create_markdown_artifact(key="kd-audit-report", markdown=report.markdown.read_text(),
                             description=f"kdsec audit report ({summary['verdict']})")
    create_table_artifact(key="kd-gates", table=[
        {"gate": name, "verdict": gate["verdict"]} for name, gate in summary["gates"].items()])
    return {**summary, "summary_path": str(summary_path)}
