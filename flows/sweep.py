"""The `kd-sweep` sub-flow: every member of the distillation grid as a parallel task, on
threads (default), on a local Dask cluster (``sweep.task_runner: dask``), or on the Dask
cluster at ``compute.dask_address``. On that cluster the data and each kind of teacher signal
are scattered to every worker once, and members return their checkpoints as bytes written here:
workers need no shared storage."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from kdsec.trainers import TrainedModel
from kdsec.config import PipelineConfig
from kdsec.data import DataBundle
from kdsec.distill import signals_key
from kdsec.sweep import MemberResult, sweep_grid
from kdsec.fileio import write_atomic
from tasks.pipeline import distill_member_bytes_task, distill_member_task


def task_runner(config: PipelineConfig):
    sweep = config.sweep
    if config.compute.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=config.compute.dask_address,
                              client_kwargs={"timeout": config.compute.connect_timeout})
    if sweep.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=sweep.max_workers)
    from prefect_dask import DaskTaskRunner

    # One single-threaded process per worker: members train truly in parallel, no GIL shared.
    return DaskTaskRunner(cluster_kwargs={"n_workers": sweep.max_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="kd-sweep", log_prints=True)
def kd_sweep(config: PipelineConfig, bundle: DataBundle, signals: dict[str, str],
             out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    """Train every member from the stored teacher signals (``signals``: one file per signal kind)."""
    logger = get_run_logger()
    members = sweep_grid(config)
    if config.compute.dask_address:
        results = _members_on_cluster(config, bundle, members, signals, out_dir)
    else:
        results = _members_here(config, bundle, members, signals, out_dir)
    for _, result in results:
        logger.info("sweep %s: val %.4f, test %.4f, %d params", result.member.name, result.val_accuracy,
                    result.test_accuracy, result.params)
    return results


def _members_here(config: PipelineConfig, bundle: DataBundle, members: list, signals: dict[str, str],
                  out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    threads = 0
    if config.sweep.task_runner == "dask":  # a local cluster: its worker processes share the cores
        threads = max(1, (os.cpu_count() or 1) // config.sweep.max_workers)
    futures = [distill_member_task.submit(config, bundle, member,
                                          signals[signals_key(member.apply(config).distill)],
                                          out_dir / "sweep" / f"{member.name}.safetensors", threads)
               for member in members]
    return [future.result() for future in futures]


def _members_on_cluster(config: PipelineConfig, bundle: DataBundle, members: list, signals: dict[str, str],
                        out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    """Members as tasks on the cluster: the bundle and each signal file's bytes scattered to every
    worker once; each member's checkpoint comes back as bytes and is written under ``out_dir``."""
    client = FlowRunContext.get().task_runner.client
    shared_bundle = client.scatter(bundle, broadcast=True, hash=False)
    shared_signals = {kind: client.scatter(Path(path).read_bytes(), broadcast=True, hash=False)
                      for kind, path in signals.items()}
    futures = [distill_member_bytes_task.submit(config, shared_bundle, member,
                                                shared_signals[signals_key(member.apply(config).distill)])
               for member in members]
    results = []
    for member, future in zip(members, futures, strict=True):
        trained, result, checkpoint_bytes = future.result()
        checkpoint = str(write_atomic(out_dir / "sweep" / f"{member.name}.safetensors", checkpoint_bytes))
        results.append((replace(trained, checkpoint=checkpoint), replace(result, checkpoint=checkpoint)))
    return results


def run_sweep(config: PipelineConfig, bundle: DataBundle, signals: dict[str, str],
              out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    return kd_sweep.with_options(task_runner=task_runner(config))(config, bundle, signals, out_dir)
