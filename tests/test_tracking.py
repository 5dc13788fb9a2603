"""The registry's team rules on a real (SQLite) MLflow store: abandoned runs are closed, the later
run wins an alias, and a local store records who acted as unauthenticated."""

import re
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


# --- promotion needs the pipeline's signed verdict ------------------------------------------------


@pytest.fixture
def signer(workdir):
    from kdsec.crypto.keys import load_or_create_signer

    return load_or_create_signer("KDSEC_TEST_UNSET", workdir / "signing.pem")


def _registered(client, experiment, passed: bool, signer=None, audit: str = '{"audit": 1}', started: int = 1_000):
    """A version as the pipeline registers it (parent run with report/audit.json, nested run, gate
    tags), attested with ``signer`` when given."""
    import hashlib

    from kdsec.gates import GateVerdict

    parent = client.create_run(experiment, start_time=started).info.run_id
    client.log_text(parent, audit, "report/audit.json")
    nested = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_text(nested, "weights", "model/model.safetensors")
    verdicts = [GateVerdict("accuracy", True, []), GateVerdict("membership", passed, [])]
    version = tracking.register_candidate(f"runs:/{nested}/model", "m", verdicts, nested, {})
    if signer is not None:
        tracking.attest_version({"model": "m", "version": version}, verdicts, signer, {"kind": "direct", "by": None},
                                hashlib.sha256(audit.encode()).hexdigest())
    return str(version), verdicts


def _approve(version, signer):
    return tracking.review("m", version, "approve", "ok", "champion", "candidate", True, signer.public)


def test_review_approves_only_what_the_pipeline_attested_and_writes_nothing_when_it_refuses(store, signer):
    client, experiment = store
    client.create_registered_model("m")
    hand_made, _ = _registered(client, experiment, passed=True)  # gates=pass tags, no attestation
    failed, _ = _registered(client, experiment, passed=False, signer=signer)
    client.set_model_version_tag("m", failed, "gates", "pass")  # re-tagged by hand
    altered, _ = _registered(client, experiment, passed=True, signer=signer)
    parent = tracking.version_pipeline_run("m", altered)
    client.log_text(parent, '{"audit": "rewritten"}', "report/audit.json")  # the report swapped after the run
    swapped, _ = _registered(client, experiment, passed=True, signer=signer)
    client.log_text(client.get_model_version("m", swapped).run_id, "other weights", "model/model.safetensors")
    cases = {hand_made: f"version {hand_made} of 'm' carries no verdict attestation",
             swapped: f"version {swapped}: its model files (weights, serving settings or code) are not the ones",
             failed: f"version {failed} did not pass its gates (the pipeline attested: membership failed)",
             altered: f"version {altered}: the audit.json published with its run"}
    for version, message in cases.items():
        with pytest.raises(tracking.KdsecError, match=re.escape(message)) as caught:
            _approve(version, signer)
        assert "\n" not in str(caught.value)
        assert not any(key.startswith("review.") for key in client.get_model_version("m", version).tags)
    assert tracking.champion_version("m", "champion") is None
    genuine, _ = _registered(client, experiment, passed=True, signer=signer)
    assert _approve(genuine, signer)["champion"] == genuine


def test_the_pipeline_never_promotes_a_hand_made_version_however_late(store, signer):
    client, experiment = store
    client.create_registered_model("m")
    settings = type("Tracking", (), {"registered_model": "m", "alias": "champion", "require_approval": False,
                                     "candidate_alias": "candidate"})()
    version, verdicts = _registered(client, experiment, passed=True, started=1_000)
    forged, _ = _registered(client, experiment, passed=True, started=9_000)  # later, gates=pass, unsigned
    registered = {"model": "m", "version": version, "previous_champion": None}
    result = tracking.promote(settings, registered, verdicts, signer, {"kind": "direct", "by": "local:me"}, "0" * 64,
                              signer.public)
    assert result["promoted"] and tracking.champion_version("m", "champion") == version != forged
