"""The `kd-pipeline` flow: data → teacher → students (scratch + KD) → compression → encryption
(at rest + homomorphic) → audit → gates → registry → report.

The flow only wires tasks (``tasks.pipeline`` computes, ``tasks.tracking`` records); the helpers
below it handle the cache (a cached result whose file is gone is computed again) and the sweep.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from kdsec import cache, roles, tracking
from kdsec.audit.run import reference_jobs
from kdsec.cache import code_version
from kdsec.compress.candidates import compression_metrics, load_variant, select_candidate
from kdsec.config import PipelineConfig, config_from_dict, load_config
from kdsec.crypto.package import AtRestResult
from kdsec.he import HEResult
from kdsec.device import parallel_share, torch_threads
from kdsec.distill import signals_key
from kdsec.errors import KdsecError
from kdsec.fileio import PRIVATE, write_atomic
from kdsec.gates import (Metric, evaluate_gates, gate_metrics, gate_sources, membership_worst_case,
                         switched_off_gates)
from kdsec.preflight import preflight
from kdsec.summary import Summary, build_summary
from kdsec.sweep import select_best, sweep_grid
from kdsec.trainers import TrainedModel
from tasks.pipeline import (at_rest_task, audit_task, compress_task, distill_task, explain_task, he_task,
                            prepare_data_task, teacher_signals_task, train_dp_task, train_references_cluster_task,
                            train_references_task, train_scratch_task, train_teacher_task)
from tasks.tracking import (claim_request_task, open_run_task, promote_task, publish_audit_task, register_task,
                            report_task, run_trigger, track_data_task, track_gates_task, track_model_task,
                            track_stage_task, track_sweep_task)
from flows.run_requests import pinned_parameters
from flows.sweep import run_sweep


@flow(name="kd-pipeline", log_prints=True)
def kd_pipeline(config: dict | None = None, config_path: str | None = None,
                overrides: list[str] | None = None, request_run_id: str | None = None) -> Summary:
    """Run the whole pipeline; return the summary (also written to ``summary.json``).

    Pass a resolved config mapping (as the CLI does), or a config path plus dotted overrides
    (as a deployment does), or ``request_run_id``: an authenticated run request (``kdsec
    trigger``) that names who asked and the config path and overrides to run.
    """
    cfg, trigger = _resolve(config, config_path, overrides, request_run_id)
    run = open_run_task(cfg, trigger)
    succeeded = False
    try:
        clock = _Clock()
        bundle = prepare_data_task(cfg)
        bundle.save(run.out_dir / "splits.npz")
        track_data_task(run.run_id, bundle, clock.span())

        cache_hits: dict = {}
        clock.start()
        teacher = _cached(train_teacher_task, cache_hits, "teacher", cfg, bundle, cache.teacher_checkpoint(cfg, bundle))
        teacher_cache = _cache_counts(cache_hits)["teacher"]
        track_model_task(run.run_id, teacher, teacher_cache, clock.span())
        clock.start()
        cfg, student, signals, sweep = _distill(cfg, bundle, teacher, run, cache_hits)
        spans = {roles.KD_STUDENT: clock.span()}
        own_signals = signals[signals_key(cfg.distill)]
        scratch = train_scratch_task(cfg, bundle, run.out_dir / "scratch_student.safetensors")  # same arch
        spans[roles.SCRATCH_STUDENT] = clock.span(after=spans[roles.KD_STUDENT])
        trained = [teacher, scratch, student]
        if cfg.student.dp.enabled:
            trained.append(train_dp_task(cfg, bundle, run.out_dir / "dp_student.safetensors"))
            spans[roles.DP_STUDENT] = clock.span(after=spans[roles.SCRATCH_STUDENT])
        for model in trained[1:]:
            track_model_task(run.run_id, model, "miss", spans[model.role])

        clock.start()
        variants = compress_task(cfg, bundle, student, run.out_dir, own_signals)
        candidate = select_candidate(variants, teacher.val_accuracy, cfg.gates, cfg.compress.selection)
        track_stage_task(run.run_id, "compress", compression_metrics(variants),
                         {"variants": [v.as_dict() for v in variants], "candidate": candidate.name},
                         [Path(v.checkpoint) for v in variants[1:]], clock.span())
        clock.start()

        at_rest: AtRestResult = at_rest_task(cfg, bundle, candidate, run.out_dir / "package", run.run_id)
        track_stage_task(run.run_id, "encrypt-at-rest", at_rest.metrics(), at_rest.labels(),
                         sorted((run.out_dir / "package").iterdir()), clock.span())
        clock.start()
        he: HEResult = he_task(cfg, bundle, candidate, run.out_dir / "he")
        track_stage_task(run.run_id, "homomorphic", he.metrics(), he.as_dict(), sorted(run.out_dir.glob("he/*")),
                         clock.span())

        clock.start()
        started = time.perf_counter()
        references = _references(cfg, bundle, cache_hits)
        models = {model.role: model.load() for model in trained}
        models.update({roles.variant_role(v.name): load_variant(v) for v in variants if v.name != roles.DENSE})
        audit = audit_task(cfg, bundle, models, references, roles.variant_role(candidate.name), teacher.train_seconds,
                           time.perf_counter() - started)
        track_stage_task(run.run_id, "audit", audit.metrics(),
                         {"models": list(audit.by_role), "reference_models": audit.reference_models}, span=clock.span())
        clock.start()
        explanations = explain_task(cfg, bundle, models, roles.variant_role(candidate.name), run.out_dir)
        if explanations is not None:
            track_stage_task(run.run_id, "explain", explanations.metrics(), explanations.as_dict(),
                             [Path(explanations.figure)], span=clock.span())

        metrics = gate_metrics(teacher.test_accuracy, candidate.test_accuracy, audit.candidate, he, at_rest,
                               audit.extraction, explanations, audit.dp_audits)
        verdicts = evaluate_gates(metrics, cfg.gates, switched_off_gates(cfg), gate_sources(audit.candidate, he))
        track_gates_task(run.run_id, metrics, verdicts)
        registered = register_task(cfg, run.run_id, bundle, candidate, verdicts, {
            "data.fingerprint": bundle.fingerprint, "candidate.variant": candidate.name,
            "package.version": run.run_id, "package.kek_id": at_rest.kek_id,
            "package.signer": at_rest.signer_key_id, "config.digest": run.config_digest,
            tracking.TRIGGERED_BY: trigger["by"] or f"unknown ({trigger['kind']})"})

        def summarize(registry: dict) -> Summary:
            return build_summary(
                run_id=run.run_id, config_digest=run.config_digest, code_version=code_version("."), bundle=bundle,
                models=trained, caches=_cache_counts(cache_hits),
                variants=variants, candidate=candidate, selection=cfg.compress.selection, at_rest=at_rest, he=he,
                audit=audit, verdicts=verdicts, registry=registry, output_dir=run.out_dir, sweep=sweep,
                explanations=explanations,
                distill={**cfg.distill.model_dump(mode="json"), "student": cfg.student.model_options(),
                         "signals": signals})

        # audit.json holds nothing of the registry's outcome: it is published (and its digest
        # attested) before any alias moves.
        audit_sha256 = publish_audit_task(run.run_id, summarize(registered), run.out_dir)
        registration = promote_task(cfg, registered, verdicts, trigger, audit_sha256)
        summary = report_task(run.run_id, summarize(registration), run.out_dir)
        _log_outcome(cfg, summary)
        succeeded = True
        return summary
    finally:
        tracking.finish_run(run.run_id, succeeded)


class _Clock:
    """Stage spans for the stage runs, which are recorded after their stage ran: ``start()``
    before a stage, ``span()`` (its start, now) when recording it."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.mark = time.time()

    def span(self, after: tuple[float, float] | None = None) -> tuple[float, float]:
        """(start, now); ``after`` a span: (its end, now), for stages that ran back to back."""
        return (after[1] if after else self.mark), time.time()


def _resolve(config: dict | None, config_path: str | None, overrides: list[str] | None,
             request_run_id: str | None) -> tuple[PipelineConfig, dict]:
    """The config (a resolved mapping, a path plus overrides, or those of a run request), checked
    before anything runs, and who started the run (``kind``, ``by``); a deployed run moves to
    ``KDSEC_WORKDIR`` first (its outputs, cache, keys, a local store)."""
    if request_run_id:
        if config is not None:
            raise KdsecError("a run request names its config path and overrides: pass no config mapping with it")
        trigger = claim_request_task(request_run_id, config_path, overrides)
        config_path, overrides = trigger.pop("config_path"), trigger.pop("overrides")
    cfg = config_from_dict(config) if config is not None else load_config(config_path, overrides or [])
    if workdir := os.environ.get("KDSEC_WORKDIR"):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
        get_run_logger().info("working directory %s (KDSEC_WORKDIR)", workdir)
    preflight(cfg)
    if not request_run_id:
        trigger = run_trigger()
        if trigger["kind"] == "schedule" and _parameters_changed(config, config_path, overrides):
            trigger = {"kind": "schedule with changed parameters", "by": None}
    get_run_logger().info("started by %s (%s)", trigger["by"] or "nobody known", trigger["kind"])
    return cfg, trigger


def _parameters_changed(config: dict | None, config_path: str | None, overrides: list[str] | None) -> bool:
    """Whether a scheduled run's parameters differ from those deployments/prefect.yaml pins for its
    deployment: Prefect's API lets anyone change them, or schedule runs on demand, so only a run of
    the pinned config counts as the schedule's (any reviewer may approve it)."""
    from prefect import runtime as prefect_runtime

    try:
        pinned = pinned_parameters(str(prefect_runtime.deployment.name))
    except KdsecError:
        return True
    return config is not None or (config_path, list(overrides or [])) != (pinned.get("config_path"),
                                                                          list(pinned.get("overrides") or []))


def _cached(task, cache_hits: dict, kind: str, *args):
    """The task's (possibly cached) result; computed again when the cached entry's file (a
    checkpoint or a signal file) has gone missing. Counts hits into ``cache_hits[kind]``."""
    state = task(*args, return_state=True)
    return _result_or_recompute(task, state, cache_hits, kind, args)


def _result_or_recompute(task, state, cache_hits: dict, kind: str, args: tuple):
    result = state.result()
    path = result.checkpoint if isinstance(result, TrainedModel) else result
    counts = cache_hits.setdefault(kind, {"hit": 0, "total": 0})
    counts["total"] += 1
    if not Path(path).is_file():
        return task.with_options(refresh_cache=True)(*args)
    counts["hit"] += state.name == "Cached"
    return result


def _cache_counts(cache_hits: dict) -> dict:
    """The summary's ``cache``: the teacher hit or missed; signals and references as counts."""
    return {**cache_hits, "teacher": "hit" if cache_hits["teacher"]["hit"] else "miss"}


def _references(config: PipelineConfig, bundle, cache_hits: dict) -> dict[str, list[str]]:
    """K reference models per architecture group, cached like the teacher by files named by their
    key (same data + architecture + training + code → same models), as ``reference_jobs`` tasks,
    ``audit.parallel_references`` at once with an even share of the cores each; or, with
    ``compute.dask_address`` set, as tasks on that Dask cluster."""
    counts = cache_hits.setdefault("references", {"hit": 0, "total": 0})
    references: dict[str, list[str]] = {}
    if config.compute.dask_address:  # the missing ones as tasks on the Dask cluster
        for group, (paths, hits) in train_references_cluster_task(config, bundle).items():
            references[group] = paths
            counts["total"] += len(paths)
            counts["hit"] += hits
        return references
    width = max(1, config.audit.parallel_references)
    jobs = reference_jobs(config, bundle, width)
    for start in range(0, len(jobs), width):
        wave = jobs[start:start + width]
        with torch_threads(parallel_share(len(wave))):  # one torch thread per training at once: no oversubscription
            futures = [(group, train_references_task.submit(config, bundle, group, share)) for group, share in wave]
            for group, future in futures:
                paths, hits = future.result()
                references.setdefault(group, []).extend(paths)
                counts["total"] += len(paths)
                counts["hit"] += hits
    return references


def _distill(cfg: PipelineConfig, bundle, teacher: TrainedModel, run, cache_hits: dict):
    """The distilled student: one, or the best member of the ``sweep`` grid by validation
    accuracy. Returns the config with the chosen settings, the student, the signal files (one
    per kind) and the sweep record (None without a sweep)."""
    members = sweep_grid(cfg)
    signals: dict[str, str] = {}
    for member in members:  # one stored signal file per kind the members need
        member_cfg = member.apply(cfg)
        if (kind := signals_key(member_cfg.distill)) not in signals:
            signals[kind] = _cached(teacher_signals_task, cache_hits, "signals", member_cfg, bundle, teacher,
                                    cache.signals_path(member_cfg, bundle, teacher.checkpoint))
    if len(members) == 1:
        cfg = members[0].apply(cfg)
        student = distill_task(cfg, bundle, run.out_dir / "kd_student.safetensors", signals[signals_key(cfg.distill)])
        return cfg, student, signals, None
    started = time.time()
    results = run_sweep(cfg, bundle, signals, run.out_dir)
    best = select_best([result for _, result in results])
    tracked = track_sweep_task(run.run_id, cfg, results, best, run.out_dir, (started, time.time()))
    trained = next(model for model, result in results if result.member.name == best.member.name)
    checkpoint = write_atomic(run.out_dir / "kd_student.safetensors", Path(trained.checkpoint).read_bytes(),
                              mode=PRIVATE)
    student = replace(trained, role=roles.KD_STUDENT, checkpoint=str(checkpoint))
    get_run_logger().info("sweep: %d members on %s; best %s (val %.4f)", len(results), cfg.sweep.task_runner,
                          best.member.name, best.val_accuracy)
    record = {"members": [result.row() for _, result in results], "best": best.member.name,
              "selected_by": "val_accuracy", "task_runner": cfg.sweep.task_runner, **tracked}
    return best.member.apply(cfg), student, signals, record


def _log_outcome(cfg: PipelineConfig, summary: Summary) -> None:
    logger = get_run_logger()
    models = summary.models
    logger.info("teacher %.4f (cache %s); students: scratch %.4f, distilled %.4f; candidate %s %.4f (%d bytes)",
                models[roles.TEACHER].test_accuracy, summary.teacher_cache, models[roles.SCRATCH_STUDENT].test_accuracy,
                models[roles.KD_STUDENT].test_accuracy, summary.candidate.variant, summary.candidate.test_accuracy,
                summary.candidate.size_bytes)
    if summary.he.enabled:
        logger.info("HE: agreement %.4f, %.2f ms/sample batched", summary.he.agreement, summary.he.ms_per_sample)
    worst = membership_worst_case(summary.candidate_audit.attacks)
    (auc_attack, auc), (tpr_attack, tpr) = worst[Metric.MEMBERSHIP_AUC], worst[Metric.MEMBERSHIP_TPR]
    logger.info("audit: %.1f s (%.2f× teacher training); candidate worst case over attacks: AUC %.3f (%s), "
                "TPR@%.3g %.3f (%s); cache %s", summary.audit_timing.seconds,
                summary.audit_timing.ratio_to_teacher_training, auc, auc_attack, cfg.audit.low_fpr, tpr, tpr_attack,
                summary.cache)


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
