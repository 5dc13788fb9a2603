"""The registry's team rules on a real (SQLite) MLflow store: abandoned runs are closed, the later
run wins an alias, and a local store records who acted as unauthenticated."""

import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from kdsec import tracking


@pytest.fixture
def store(workdir):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return MlflowClient(), MlflowClient().create_experiment("kdsec")


def test_a_running_run_whose_process_is_gone_is_closed_and_a_live_one_is_not(store):
    client, experiment = store
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tracking.start_parent_run(experiment, "killed", {})
    client.set_tag(killed, "kdsec.pid", gone.stdout.strip())  # a process that has exited
    alive = tracking.start_parent_run(experiment, "alive", {})  # this process
    elsewhere = tracking.start_parent_run(experiment, "elsewhere", {"kdsec.prefect_flow_run_id": "abc"})
    client.set_tag(elsewhere, "kdsec.host", "another-host")

    closed = tracking.close_abandoned_runs(experiment, lambda tags: None)
    assert closed == [killed]
    assert client.get_run(killed).info.status == "FAILED"
    assert "is gone" in client.get_run(killed).data.tags["kdsec.closed"]
    assert client.get_run(alive).info.status == "RUNNING" and client.get_run(elsewhere).info.status == "RUNNING"
    # Another host's run is closed only on the orchestrator's word (e.g. its flow run crashed).
    closed = tracking.close_abandoned_runs(experiment, lambda tags: "flow run Crashed" if tags.get(
        "kdsec.prefect_flow_run_id") == "abc" else None)
    assert closed == [elsewhere] and "Crashed" in client.get_run(elsewhere).data.tags["kdsec.closed"]


def test_the_later_started_run_keeps_the_alias_whatever_order_they_finish_in(store):
    client, experiment = store
    client.create_registered_model("m")
    early = client.create_run(experiment, start_time=1_000).info.run_id
    late = client.create_run(experiment, start_time=2_000).info.run_id
    passing = lambda v: v.tags.get("gates") == "pass"  # noqa: E731
    # The later run registers and settles first; the earlier one finishes last and cannot take it.
    v_late = tracking.register_candidate(f"runs:/{late}/model", "m", [], late, {})
    assert tracking.settle_alias("m", "champion", passing) == str(v_late)
    v_early = tracking.register_candidate(f"runs:/{early}/model", "m", [], early, {})
    assert tracking.settle_alias("m", "champion", passing) == str(v_late)
    assert client.get_model_version("m", v_early).tags["kdsec.run_started"] == "1000"
    # A failing version is never eligible, however late its run.
    latest = client.create_run(experiment, start_time=3_000).info.run_id
    client.create_model_version("m", f"runs:/{latest}/model", run_id=latest,
                                tags={"gates": "fail", "kdsec.run_started": "3000"})
    assert tracking.settle_alias("m", "champion", passing) == str(v_late)
    assert str(client.get_model_version_by_alias("m", "champion").version) == str(v_late)


def test_a_local_store_authenticates_nobody(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    who = tracking.identity()
    assert who.name.startswith("local:") and not who.authenticated
