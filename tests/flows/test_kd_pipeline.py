"""The real kd-pipeline flow under Prefect's test harness, on digits, with a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from kdsec.cli import app
from tests.conftest import SMALL_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One working directory (MLflow store, outputs, key file) shared by the runs below, in order."""
    root = tmp_path_factory.mktemp("pipeline")
    return root


def _run(store: Path, monkeypatch, *extra: str):
    monkeypatch.chdir(store)
    args = ["run"]
    for override in [*SMALL_OVERRIDES, *extra]:
        args += ["--set", override]
    return CliRunner().invoke(app, args)


def _summary(result) -> dict:
    path = next(line.split("summary:", 1)[1].strip() for line in result.output.splitlines() if "summary:" in line)
    return json.loads(Path(path).read_text())


def test_passing_run_promotes_champion(store, monkeypatch):
    result = _run(store, monkeypatch)
    assert result.exit_code == 0, result.output
    summary = _summary(result)
    assert summary["verdict"] == "pass" and summary["promoted"]
    assert set(summary["gates"]) == {"accuracy", "membership", "he", "at_rest"}
    assert summary["data"]["splits"] == {"train": 897, "val": 180, "test": 360, "holdout": 360}
    assert summary["models"]["teacher"]["test_accuracy"] > 0.9
    assert summary["he"]["agreement"] >= 0.99 and summary["he"]["samples"] == 128
    assert {"teacher", "scratch_student", "kd_student", "candidate"} == set(summary["audit"])
    assert Path(summary["report"]["html"]).read_text().count("data:image/png;base64") == 3

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    version = client.get_model_version_by_alias("kdsec-student", "champion")
    assert version.version == str(summary["registry"]["version"])
    assert version.tags["gates"] == "pass"
    assert all(version.tags[f"gate.{gate}"] == "pass" for gate in summary["gates"])

    # Nested runs per stage under one parent, with the summary and config logged.
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    stages = {run.info.run_name for run in children}
    assert {"data", "teacher", "scratch_student", "kd_student", "compress", "encrypt-at-rest", "homomorphic",
            "audit", "register"} <= stages
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"summary.json", "config.yaml", "report"} <= artifacts
    assert parent.inputs.dataset_inputs[0].dataset.digest == summary["data"]["fingerprint"]

    # The registered model predicts labels from raw 0-16 pixels, as numpy or DataFrame.
    model = mlflow.pyfunc.load_model("models:/kdsec-student@champion")
    digits = load_digits()
    import pandas as pd

    predictions = model.predict(digits.data[:300])
    assert np.array_equal(predictions, model.predict(pd.DataFrame(digits.data[:300])))
    assert (predictions == digits.target[:300]).mean() > 0.85

    # Secrets never reach the summary or MLflow.
    key = (store / ".kdsec" / "keys" / "model.key").read_text().strip()
    assert key not in json.dumps(summary)
    assert key not in json.dumps(parent.data.params) + json.dumps(parent.data.tags)


def test_second_run_reuses_the_cached_teacher(store, monkeypatch):
    result = _run(store, monkeypatch)
    assert result.exit_code == 0, result.output
    assert _summary(result)["teacher_cache"] == "hit"


def test_impossible_threshold_fails_the_gate_and_keeps_champion(store, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    before = MlflowClient().get_model_version_by_alias("kdsec-student", "champion").version
    result = _run(store, monkeypatch, "gates.min_accuracy=1.0")
    assert result.exit_code == 2, result.output
    assert "gate(s) failed: accuracy" in result.output
    summary = _summary(result)
    assert summary["verdict"] == "fail" and not summary["promoted"] and summary["failed_gates"] == ["accuracy"]
    client = MlflowClient()
    assert client.get_model_version_by_alias("kdsec-student", "champion").version == before
    failed = client.get_model_version("kdsec-student", str(summary["registry"]["version"]))
    assert failed.tags["gates"] == "fail" and failed.tags["gate.accuracy"] == "fail"
    assert "champion" not in (failed.aliases or [])


def test_bad_config_exits_1_with_one_line_and_logs_no_model(store, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    versions_before = len(MlflowClient().search_model_versions("name='kdsec-student'"))
    result = _run(store, monkeypatch, "distill.temperature=-2")
    assert result.exit_code == 1
    assert "distill.temperature" in result.output
    assert len(MlflowClient().search_model_versions("name='kdsec-student'")) == versions_before


def test_wrong_model_key_is_one_line_error(store, monkeypatch):
    monkeypatch.setenv("KDSEC_MODEL_KEY", "not-a-key")
    result = _run(store, monkeypatch)
    assert result.exit_code == 1
    assert "KDSEC_MODEL_KEY must hold a 32-byte key" in result.output
