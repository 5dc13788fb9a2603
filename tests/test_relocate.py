"""A project folder moved with its local store: `kdsec relocate-store` points MLflow's recorded
(absolute) artifact locations at the new place; runs, artifacts and registered versions read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def _make_store(root: Path) -> tuple[str, str]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    os.chdir(root)
    experiment = mlflow.set_experiment("kdsec")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_dict({"verdict": "pass"}, "report/summary.json")
        mlflow.log_param("data.root", str(root / "data"))  # history: stays as it was recorded
    client = MlflowClient()
    client.create_registered_model("kdsec-student")
    version = client.create_model_version("kdsec-student", f"{run.info.artifact_uri}/report", run.info.run_id)
    return run.info.run_id, str(version.version)


def test_a_moved_project_reads_its_store_after_relocate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "old-place", tmp_path / "new-place"
    old.mkdir()
    run_id, version = _make_store(old)
    shutil.move(old, new)
    monkeypatch.chdir(new)
    mlflow.set_tracking_uri(f"sqlite:///{new / 'mlflow.db'}")
    with pytest.raises((OSError, MlflowException)):  # before: the store still points at the old folder
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report/summary.json", dst_path=str(tmp_path / "a"))

    done = subprocess.run([sys.executable, "-m", "kdsec.cli", "relocate-store", "--from", str(old)], cwd=new,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "location(s) moved" in done.stdout, done.stdout + done.stderr
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report/summary.json",
                                               dst_path=str(tmp_path / "b"))
    assert '"pass"' in Path(path).read_text()
    source = MlflowClient().get_model_version("kdsec-student", version).source
    assert source.startswith(str(new)) and str(old) not in source
    run = MlflowClient().get_run(run_id)
    assert str(old) not in run.info.artifact_uri and run.data.params["data.root"] == str(old / "data")
    again = subprocess.run([sys.executable, "-m", "kdsec.cli", "relocate-store", "--from", str(old)], cwd=new,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 recorded artifact location(s)" in again.stdout  # idempotent


def test_relocate_refuses_a_relative_origin_and_a_missing_store(tmp_path):
    for args, message in ((["--from", "relative/path"], "previous absolute path"), (["--from", "/"], "not '/'"),
                          (["--from", str(tmp_path.parent)], "inside the old one"),
                          (["--from", "/elsewhere", "--store", "absent.db"], "no SQLite tracking store")):
        done = subprocess.run([sys.executable, "-m", "kdsec.cli", "relocate-store", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stdout + done.stderr
