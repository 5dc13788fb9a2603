"""Prefect tasks around kdsec's pipeline stages: caching of the teacher, its signals and the
reference models; nothing here tracks (see ``tasks.tracking``), so a cached result is identical
to a fresh one."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from kdsec import cache
from kdsec.audit.run import AuditOutcome, all_reference_checkpoints, audit_pipeline, reference_checkpoints
from kdsec.compress.candidates import compress_student
from kdsec.compress.measure import VariantMetrics
from kdsec.config import PipelineConfig
from kdsec.he import HEResult
from kdsec.crypto.package import AtRestResult
from kdsec.he.stage import homomorphic_inference
from kdsec.crypto.protect import package_metadata, protect_at_rest
from kdsec.data import DataBundle, prepare_data
from kdsec.explain import ExplainResult, explain_models
from kdsec.sweep import MemberResult, SweepMember
from kdsec.trainers import (TrainedModel, distill_member, distill_student, distiller_for, store_teacher_signals,
                            train_dp_student, train_scratch_student, train_teacher)


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data_task(config: PipelineConfig) -> DataBundle:
    return prepare_data(config.data)


def _teacher_key(context: TaskRunContext, parameters: dict) -> str:
    config: PipelineConfig = parameters["config"]
    return cache.teacher_key(parameters["bundle"].fingerprint, config.teacher, config.seed)


@task(name="train-teacher", cache_key_fn=_teacher_key, persist_result=True)
def train_teacher_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    return train_teacher(config, bundle, checkpoint)


@task(name="train-scratch-student", cache_policy=NO_CACHE)
def train_scratch_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    return train_scratch_student(config, bundle, checkpoint)


@task(name="train-dp-student", cache_policy=NO_CACHE)
def train_dp_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    return train_dp_student(config, bundle, checkpoint)


def _signals_key(context: TaskRunContext, parameters: dict) -> str:
    return Path(parameters["path"]).stem  # cache.signals_path names the file by the key


@task(name="teacher-signals", cache_key_fn=_signals_key, persist_result=True)
def teacher_signals_task(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel, path: Path) -> str:
    """The teacher's logits (+ feature targets) on the transfer split, computed once, stored as
    safetensors and cached: every student of the run (and of later runs) reads the file."""
    return store_teacher_signals(config, bundle, teacher, path)


@task(name="distill-student", cache_policy=NO_CACHE)
def distill_task(config: PipelineConfig, bundle: DataBundle, checkpoint: Path, signals: str) -> TrainedModel:
    return distill_student(config, bundle, None, checkpoint, signals)


@task(name="distill-member", cache_policy=NO_CACHE)
def distill_member_task(config: PipelineConfig, bundle: DataBundle, member: SweepMember, signals: str,
                        checkpoint: Path, torch_threads: int = 0) -> tuple[TrainedModel, MemberResult]:
    return distill_member(config, bundle, member, signals, checkpoint, torch_threads)


@task(name="distill-member", cache_policy=NO_CACHE)
def distill_member_bytes_task(config: PipelineConfig, bundle: DataBundle, member: SweepMember,
                              signals: bytes) -> tuple[TrainedModel, MemberResult, bytes]:
    """A sweep member on a Dask worker with no shared storage: the teacher signals come as bytes,
    the checkpoint goes back as bytes (the flow writes it); one torch thread, as a local Dask
    member has on 2 cores."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kdsec-member-") as folder:
        signals_path = Path(folder) / "signals.safetensors"
        signals_path.write_bytes(signals)
        trained, result = distill_member(config, bundle, member, signals_path,
                                         Path(folder) / f"{member.name}.safetensors", torch_threads=1)
        return trained, result, Path(trained.checkpoint).read_bytes()


@task(name="compress", cache_policy=NO_CACHE)
def compress_task(config: PipelineConfig, bundle: DataBundle, student: TrainedModel, out_dir: Path,
                  signals: str) -> list[VariantMetrics]:
    """Pruned and quantized variants, fine-tuned with the distiller's objective on the stored signals."""
    return compress_student(config.compress, bundle, student, config.student.train, config.seed, out_dir,
                            distiller_for(config, bundle, None, signals).objective, config.distill.transfer_set,
                            homomorphic=config.encrypt.he.enabled)


@task(name="encrypt-at-rest", cache_policy=NO_CACHE)
def at_rest_task(config: PipelineConfig, bundle: DataBundle, candidate: VariantMetrics, destination: Path,
                 version: str) -> AtRestResult:
    return protect_at_rest(config, candidate, destination, version, package_metadata(bundle, candidate))


@task(name="homomorphic-inference", cache_policy=NO_CACHE)
def he_task(config: PipelineConfig, bundle: DataBundle, candidate: VariantMetrics, package_dir: Path) -> HEResult:
    return homomorphic_inference(config, bundle, candidate, package_dir)


@task(name="train-references", cache_policy=NO_CACHE)
def train_references_task(config: PipelineConfig, bundle: DataBundle, group: str,
                          indices: list[int]) -> tuple[list[str], int]:
    """Reference models ``indices`` of ``group`` (paths) and how many were cached: cached by file,
    each named by its key (data, architecture, training, index, seed, code), the missing ones
    trained together."""
    return reference_checkpoints(config, bundle, group, indices=indices)


@task(name="train-references-on-dask", cache_policy=NO_CACHE)
def train_references_cluster_task(config: PipelineConfig, bundle: DataBundle) -> dict[str, tuple[list[str], int]]:
    """Every group's reference models (paths, cached count): the cached ones by file, the missing
    ones trained as tasks on the Dask cluster at ``compute.dask_address``."""
    from prefect import get_run_logger

    return all_reference_checkpoints(config, bundle, get_run_logger().info)


@task(name="audit", cache_policy=NO_CACHE)
def audit_task(config: PipelineConfig, bundle: DataBundle, models: dict, references: dict[str, list[str]],
               candidate_role: str, teacher_train_seconds: float, reference_seconds: float) -> AuditOutcome:
    return audit_pipeline(config, bundle, models, references, candidate_role, teacher_train_seconds,
                          reference_seconds)


@task(name="explain", cache_policy=NO_CACHE)
def explain_task(config: PipelineConfig, bundle: DataBundle, models: dict, candidate_role: str,
                 out_dir: Path) -> ExplainResult | None:
    """Attributions of every model against the teacher's, and the figure; None when ``explain.enabled``
    is false (the explanation gate is then skipped)."""
    if not config.explain.enabled:
        return None
    return explain_models(models, bundle, config.explain, candidate_role, out_dir)
