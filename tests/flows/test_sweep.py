"""The `kd-sweep` sub-flow on Dask: real local cluster (worker processes), members trained from
one stored teacher-signal file, results back in the flow."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from kdsec import trainers
from kdsec.config import load_config
from kdsec.distill import signals_key
from kdsec.sweep import select_best, sweep_grid

pytestmark = pytest.mark.slow


def test_sweep_members_run_as_dask_tasks_from_stored_signals(digits, tmp_path, monkeypatch):
    from flows.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["teacher.train.epochs=6", "student.train.epochs=6", "sweep.temperature=[2,6]",
                                "sweep.loss=[hinton_kd,fitnets]", "sweep.task_runner=dask", "sweep.max_workers=2"])
    teacher = trainers.train_teacher(config, digits, tmp_path / "teacher.safetensors")
    signals = {}
    for member in sweep_grid(config):
        member_config = member.apply(config)
        kind = signals_key(member_config.distill)
        if kind not in signals:
            signals[kind] = trainers.store_teacher_signals(member_config, digits, teacher, tmp_path / f"{kind}.safetensors")
    assert set(signals) == {"logits", "fitnets:auto"}
    with prefect_test_harness(server_startup_timeout=120):
        results = run_sweep(config, digits, signals, tmp_path)
    assert [result.member.name for _, result in results] == [m.name for m in sweep_grid(config)]
    assert len(results) == 4
    for trained, result in results:
        assert Path(result.checkpoint).is_file() and trained.epochs_run == 6
        assert 0.3 < result.val_accuracy <= 1.0 and result.params == 2410
    best = select_best([result for _, result in results])
    assert best.val_accuracy == max(result.val_accuracy for _, result in results)
