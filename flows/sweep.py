"""The `kd-sweep` sub-flow: every member of the distillation grid as a parallel task, on
threads (default) or on Dask (a local cluster, or the scheduler at ``sweep.dask_address``)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from kdsec.trainers import TrainedModel
from kdsec.config import PipelineConfig
from kdsec.data import DataBundle
from kdsec.distill import signals_key
from kdsec.sweep import MemberResult, sweep_grid
from tasks.pipeline import distill_member_task


def task_runner(config: PipelineConfig):
    sweep = config.sweep
    if sweep.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=sweep.max_workers)
    from prefect_dask import DaskTaskRunner

    if sweep.dask_address:
        return DaskTaskRunner(address=sweep.dask_address)
    # One single-threaded process per worker: members train truly in parallel, no GIL shared.
    return DaskTaskRunner(cluster_kwargs={"n_workers": sweep.max_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="kd-sweep", log_prints=True)
def kd_sweep(config: PipelineConfig, bundle: DataBundle, signals: dict[str, str],
             out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    """Train every member from the stored teacher signals (``signals``: one file per signal kind)."""
    logger = get_run_logger()
    members = sweep_grid(config)
    threads = 0
    if config.sweep.task_runner == "dask" and not config.sweep.dask_address:
        threads = max(1, (os.cpu_count() or 1) // config.sweep.max_workers)
    futures = [distill_member_task.submit(config, bundle, member,
                                          signals[signals_key(member.apply(config).distill)],
                                          out_dir / "sweep" / f"{member.name}.safetensors", threads)
               for member in members]
    results = [future.result() for future in futures]
    for _, result in results:
        logger.info("sweep %s: val %.4f, test %.4f, %d params", result.member.name, result.val_accuracy,
                    result.test_accuracy, result.params)
    return results


def run_sweep(config: PipelineConfig, bundle: DataBundle, signals: dict[str, str],
              out_dir: Path) -> list[tuple[TrainedModel, MemberResult]]:
    return kd_sweep.with_options(task_runner=task_runner(config))(config, bundle, signals, out_dir)
