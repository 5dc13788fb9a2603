"""The `kd-pipeline` flow: data → teacher → students (scratch + KD) → compression → encryption
(at rest + homomorphic) → audit → gates → registry → report."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param
from prefect import flow, get_run_logger
from prefect import runtime as prefect_runtime

from kdsec import stages, tracking
from kdsec.config import PipelineConfig, config_from_dict, load_config
from kdsec.distill import signals_key
from kdsec.fileio import write_atomic
from kdsec.gates import evaluate_gates
from kdsec.sweep import select_best, sweep_grid
from kdsec.summary import build_summary, gate_metrics
from tasks.stages import (at_rest_task, audit_task, compress_task, distill_task, he_task, prepare_data_task,
                          register_task, report_task, track_data_task, track_model_task, track_stage_task,
                          extraction_task, train_dp_task, train_reference_task, train_scratch_task,
                          train_teacher_task, teacher_signals_task, track_sweep_task)
from flows.sweep import run_sweep


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _teacher(config: PipelineConfig, bundle, cache_dir: Path) -> tuple[stages.TrainedModel, str]:
    """The cached teacher and whether the cache was hit; retrained when the cached entry's
    checkpoint has gone missing."""
    key = stages.teacher_cache_key(bundle.fingerprint, config.teacher, config.seed)
    checkpoint = cache_dir / "teachers" / key / "teacher.safetensors"
    state = train_teacher_task(config, bundle, checkpoint, return_state=True)
    teacher = state.result()
    if not Path(teacher.checkpoint).is_file():
        return train_teacher_task.with_options(refresh_cache=True)(config, bundle, checkpoint), "miss"
    return teacher, "hit" if state.name == "Cached" else "miss"


def _references(config: PipelineConfig, bundle, cache: dict) -> dict[str, list[str]]:
    """K reference models per architecture, trained as parallel tasks (``audit.parallel_references``
    at a time) and cached like the teacher: same data + architecture + training + code → same models.
    Counts cache hits into ``cache["references"]``."""
    jobs = [(group, index, stages.reference_checkpoint(config, bundle, group, index))
            for group in stages.reference_plan(config, bundle) for index in range(config.audit.reference_models)]
    references: dict[str, list[str]] = {}
    hits = 0
    width = config.audit.parallel_references
    for start in range(0, len(jobs), width):
        wave = [(job, train_reference_task.submit(config, bundle, job[0], job[1], job[2]))
                for job in jobs[start:start + width]]
        for (group, index, checkpoint), future in wave:
            path = future.result()
            if not Path(path).is_file():  # a cache entry whose file is gone: train again
                path = train_reference_task.with_options(refresh_cache=True)(config, bundle, group, index, checkpoint)
            else:
                hits += future.state.name == "Cached"
            references.setdefault(group, []).append(path)
    cache["references"] = {"hit": hits, "total": len(jobs)}
    return references


def _signals(bundle, teacher: stages.TrainedModel, configs: list[PipelineConfig], cache: dict) -> dict[str, str]:
    """One stored signal file per kind the students need (logits; a feature loss's target),
    cached by Prefect across runs; recomputed when a cached file has gone missing. Counts cache
    hits into ``cache["signals"]``."""
    signals: dict[str, str] = {}
    hits = 0
    for member_config in configs:
        kind = signals_key(member_config.distill)
        if kind in signals:
            continue
        path = stages.teacher_signals_path(member_config, bundle, teacher)
        state = teacher_signals_task(member_config, bundle, teacher, path, return_state=True)
        stored = state.result()
        if not Path(stored).is_file():
            stored = teacher_signals_task.with_options(refresh_cache=True)(member_config, bundle, teacher, path)
        else:
            hits += state.name == "Cached"
        signals[kind] = stored
    cache["signals"] = {"hit": hits, "total": len(signals)}
    return signals


def _distill(cfg: PipelineConfig, bundle, teacher: stages.TrainedModel, out_dir: Path, parent: str, cache: dict):
    """The distilled student: one, or the best member of the ``sweep`` grid by validation
    accuracy. Returns the config with the chosen settings, the student, the signal files and the
    sweep record (None without a sweep)."""
    members = sweep_grid(cfg)
    signals = _signals(bundle, teacher, [member.apply(cfg) for member in members], cache)
    if len(members) == 1:
        cfg = members[0].apply(cfg)
        return cfg, distill_task(cfg, bundle, teacher, out_dir / "kd_student.safetensors",
                                 signals[signals_key(cfg.distill)]), signals, None
    results = run_sweep(cfg, bundle, signals, out_dir)
    best = select_best([result for _, result in results])
    tracked = track_sweep_task(parent, cfg, results, best, out_dir)
    trained = next(model for model, result in results if result.member.name == best.member.name)
    checkpoint = out_dir / "kd_student.safetensors"
    write_atomic(checkpoint, Path(trained.checkpoint).read_bytes())
    student = replace(trained, role="kd_student", checkpoint=str(checkpoint))
    get_run_logger().info("sweep: %d members on %s; best %s (val %.4f)", len(results), cfg.sweep.task_runner,
                          best.member.name, best.val_accuracy)
    record = {"members": [result.row() for _, result in results], "best": best.member.name,
              "selected_by": "val_accuracy", "task_runner": cfg.sweep.task_runner, **tracked}
    return best.member.apply(cfg), student, signals, record


def start_temporary_server() -> None:
    """Without ``PREFECT_API_URL`` the flow runs on Prefect's temporary server, whose database
    (in ``PREFECT_HOME``) two ``kdsec run``s at once share: its first migration is not safe to run
    twice at the same moment, so the server starts under an exclusive file lock. The flow then
    finds it started (one server per process)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    # A lock, not content: opened without following a link, never written.
    descriptor = os.open(home / "kdsec-temporary-server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        SubprocessASGIServer().start()
    finally:
        os.close(descriptor)


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


@flow(name="kd-pipeline", log_prints=True)
def kd_pipeline(config: dict | None = None, config_path: str | None = None,
                overrides: list[str] | None = None) -> dict:
    """Run the whole pipeline; return the summary (also written to ``summary.json``).

    Pass a resolved config mapping (as the CLI does), or a config path plus dotted overrides
    (as a deployment does).
    """
    cfg = config_from_dict(config) if config is not None else load_config(config_path, overrides or [])
    logger = get_run_logger()
    if workdir := os.environ.get("KDSEC_WORKDIR"):
        # A deployed run reads its code and config where the worker checked them out (the pull
        # step's directory) and keeps its state (outputs, cache, keys, a local store) here.
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
        logger.info("working directory %s (KDSEC_WORKDIR)", workdir)
    stages.preflight(cfg)
    digest = cfg.digest()  # of the config as given (a sweep later narrows it to the chosen member)
    experiment_id = tracking.configure(cfg.tracking.experiment)
    for run_id in tracking.close_abandoned_runs(experiment_id, _flow_run_ended):
        logger.warning("closed MLflow run %s as FAILED: its process was killed before it finished", run_id)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent = tracking.start_parent_run(experiment_id, f"kd-pipeline-{stamp}",
                                       {"kdsec.config_digest": digest, "kdsec.dataset": cfg.data.name,
                                        "kdsec.prefect_flow_run_id": str(prefect_runtime.flow_run.id or "")})
    out_dir = Path(cfg.tracking.output_dir) / f"{stamp}-{parent[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    succeeded = False
    try:
        write_atomic(out_dir / "config.yaml", cfg.to_yaml())
        client.log_artifact(parent, str(out_dir / "config.yaml"))
        client.log_batch(parent, params=[Param(key, str(value)[:500])
                                         for key, value in _flatten(cfg.model_dump(mode="json")).items()])

        bundle = prepare_data_task(cfg)
        logger.info("data %s: %s, fingerprint %s", bundle.name, bundle.sizes(), bundle.fingerprint)
        track_data_task(parent, bundle, bundle.save(out_dir / "splits.npz"))

        teacher, cache = _teacher(cfg, bundle, Path(cfg.tracking.cache_dir))
        caches = {"teacher": cache}
        logger.info("teacher (cache %s): test accuracy %.4f", cache, teacher.test_accuracy)
        track_model_task(parent, teacher, cache)
        cfg, student, signals, sweep = _distill(cfg, bundle, teacher, out_dir, parent, caches)
        track_model_task(parent, student)
        # The scratch baseline has the chosen student's architecture.
        scratch = train_scratch_task(cfg, bundle, out_dir / "scratch_student.safetensors")
        track_model_task(parent, scratch)
        logger.info("students: scratch %.4f, distilled %.4f", scratch.test_accuracy, student.test_accuracy)
        trained = [teacher, scratch, student]
        if cfg.student.dp.enabled:
            private = train_dp_task(cfg, bundle, out_dir / "dp_student.safetensors")
            track_model_task(parent, private)
            trained.append(private)
            logger.info("DP-SGD student: %.4f at ε=%.2f (δ=%g)", private.test_accuracy, private.privacy["epsilon"],
                        private.privacy["delta"])

        variants = compress_task(cfg, bundle, student, teacher, out_dir, signals[signals_key(cfg.distill)])
        candidate = stages.select_candidate(variants, teacher.test_accuracy, cfg.gates, cfg.compress.selection)
        track_stage_task(parent, "compress",
                         {f"{v.name}.{k}": float(val) for v in variants
                          for k, val in v.as_dict().items() if isinstance(val, (int, float))},
                         {"variants": [v.as_dict() for v in variants], "candidate": candidate.name},
                         [Path(v.checkpoint) for v in variants[1:]])
        logger.info("candidate: %s (%.4f, %d bytes)", candidate.name, candidate.test_accuracy, candidate.size_bytes)

        at_rest = at_rest_task(cfg, candidate, out_dir / "package", parent,
                               {"input_scale": bundle.input_scale, "normalization": bundle.normalization,
                                "class_names": list(bundle.class_names),
                                "data_fingerprint": bundle.fingerprint, "test_accuracy": candidate.test_accuracy})
        track_stage_task(parent, "encrypt-at-rest",
                         {key: float(value) for key, value in asdict(at_rest).items()
                          if isinstance(value, (bool, int, float))},
                         {key: value for key, value in asdict(at_rest).items() if isinstance(value, str)},
                         sorted((out_dir / "package").iterdir()))
        he = he_task(cfg, bundle, candidate, out_dir / "he")
        track_stage_task(parent, "homomorphic",
                         {f"{run.mode}.{run.path}.{key}": float(value) for run in he.runs
                          for key, value in run.as_dict().items() if isinstance(value, (int, float))},
                         he.as_dict(), sorted((out_dir / "he").glob("*")) if (out_dir / "he").is_dir() else [])
        for run in he.runs:
            logger.info("HE %s (%s): agreement %.4f, %.2f ms/sample", run.mode, run.path, run.agreement,
                        run.ms_per_sample)

        audit_started = time.perf_counter()
        references = _references(cfg, bundle, caches)
        logger.info("cache: teacher %s, teacher signals %d/%d, reference models %d/%d reused", caches["teacher"],
                    caches["signals"]["hit"], caches["signals"]["total"], caches["references"]["hit"],
                    caches["references"]["total"])
        models = {model.role: model.load() for model in trained}
        models.update({f"variant:{v.name}": stages.load_variant(v) for v in variants if v.name != "dense"})
        # int8 variants have no gradients: FGSM examples are crafted on the float model they came from.
        surrogates = {role: models[stages.variant_source_role(role)] for role in models
                      if stages.variant_source_role(role) in models}
        audits = audit_task(cfg, bundle, models, references, surrogates)
        candidate_role = "kd_student" if candidate.name == "dense" else f"variant:{candidate.name}"
        extraction = extraction_task(cfg, bundle, models[candidate_role])
        audits.append(replace(next(a for a in audits if a.role == candidate_role), role="candidate"))
        audit_seconds = time.perf_counter() - audit_started
        by_role = {audit.role: audit for audit in audits}
        track_stage_task(parent, "audit",
                         {**{f"{a.role}.{name}.{metric}": getattr(result, metric) for a in audits
                             for name, result in a.attacks.items()
                             for metric in ("auc", "tpr_at_low_fpr", "tpr_at_0_1_fpr", "balanced_accuracy")},
                          **{f"{a.role}.teacher_leakage.{metric}": getattr(a.teacher_leakage, metric) for a in audits
                             if a.teacher_leakage is not None for metric in ("auc", "tpr_at_low_fpr")},
                          **{f"{a.role}.ece": a.calibration.ece for a in audits},
                          **{f"{a.role}.worst_class_gap": a.per_class.worst_class_gap for a in audits},
                          **{f"extraction.{r.defense}.{m}": getattr(r, m) for r in extraction
                             for m in ("stolen_accuracy", "fidelity")},
                          "audit_seconds": audit_seconds,
                          "audit_to_teacher_train_ratio": audit_seconds / max(teacher.train_seconds, 1e-9)},
                         {"models": list(by_role), "reference_models": cfg.audit.reference_models})
        logger.info("audit: %.1f s (%.2f× teacher training); candidate strongest attack %s AUC %.3f TPR@%.3g %.3f",
                    audit_seconds, audit_seconds / max(teacher.train_seconds, 1e-9), by_role["candidate"].membership.attack,
                    by_role["candidate"].membership.auc, cfg.audit.low_fpr, by_role["candidate"].membership.tpr_at_low_fpr)

        metrics = gate_metrics(teacher, candidate, by_role["candidate"], he, at_rest, extraction)
        verdicts = evaluate_gates(metrics, cfg.gates, stages.switched_off_gates(cfg))
        for name, value in metrics.items():
            client.log_metric(parent, name, float(value))
        for verdict in verdicts:
            client.set_tag(parent, f"gate.{verdict.name}", verdict.verdict)
            if verdict.warnings:
                client.set_tag(parent, f"gate.{verdict.name}.warn", ",".join(verdict.warnings))
        registration = register_task(cfg, parent, bundle, candidate, verdicts,
                                     {"data.fingerprint": bundle.fingerprint, "candidate.variant": candidate.name,
                                      "package.version": parent, "package.kek_id": at_rest.kek_id,
                                      "package.signer": at_rest.signer_key_id,
                                      "config.digest": digest})

        summary = build_summary(
            run_id=parent, config_digest=digest, code_version=stages.code_version("."), bundle=bundle,
            models=trained, teacher_cache=cache, caches=caches, variants=variants, candidate=candidate,
            selection=cfg.compress.selection, at_rest=at_rest, he=he, audits=audits, verdicts=verdicts,
            registry=registration, output_dir=out_dir, audit_seconds=audit_seconds, extraction=extraction,
            sweep=sweep, distill={**cfg.distill.model_dump(mode="json"), "student": stages.arch_options(
                cfg.student.arch, cfg.student), "signals": signals})
        summary = report_task(parent, summary, out_dir)
        client.set_tag(parent, "gates", summary["verdict"])
        succeeded = True
        return summary
    finally:
        tracking.finish_run(parent, succeeded)
