"""The team stack as a team uses it (``make stack-test``): PostgreSQL, a Prefect server and an
authenticated MLflow server started natively on loopback, the nightly deployment run by a
process worker, faults survived, and review that only authenticated reviewers can complete.

The tests run in order and share one stack (its own folder and ports, so a developer's stack
is left alone); everything it started is stopped at the end, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kdsec.summary import Summary, read_summary
from tests.conftest import SMALL_OVERRIDES

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
FAST = [*SMALL_OVERRIDES, "tracking.require_approval=true"]
DEPLOYMENT = "kd-pipeline/kd-pipeline-nightly"
FIGURES: dict[str, object] = {}  # printed at the end, for the record


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def team():
    sys.path.insert(0, str(ROOT / "deployments"))
    import stack

    folder = Path(tempfile.mkdtemp(prefix="kdsec-stack-test-"))
    saved = {key: os.environ.get(key) for key in ("KDSEC_STACK_DIR", "KDSEC_PG_PORT", "KDSEC_PREFECT_PORT",
                                                   "KDSEC_MLFLOW_PORT", "KDSEC_DASK_PORT")}
    os.environ.update(KDSEC_STACK_DIR=str(folder), KDSEC_PG_PORT=str(_free_port()),
                      KDSEC_PREFECT_PORT=str(_free_port()), KDSEC_MLFLOW_PORT=str(_free_port()),
                      KDSEC_DASK_PORT=str(_free_port()))
    started = time.monotonic()
    try:
        config = stack.up()
        FIGURES["stack up (s)"] = round(time.monotonic() - started, 1)
        secret = stack.stack_secrets(config)
        deploy = subprocess.run([str(stack.BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                                 "deployments/prefect.yaml", "--all"], cwd=ROOT, capture_output=True, text=True,
                                env={**stack.prefect_env(config), "KDSEC_PROJECT_DIR": str(ROOT)})
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        yield stack, config, secret
    finally:
        pg_folder = stack.pg_dir().parent
        stopped = stack.down()
        print(f"\nteam stack figures: {json.dumps(FIGURES)}; stopped: {stopped}")
        shutil.rmtree(folder, ignore_errors=True)
        if pg_folder != folder:
            shutil.rmtree(pg_folder, ignore_errors=True)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


# --- helpers: Prefect as the operator, MLflow as one of the stack's users -------------------------


def _prefect(config):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(ROOT / "deployments"))
    import stack

    return temporary_settings(updates={PREFECT_API_URL: stack.urls(config)["prefect"]})


def _trigger(config, overrides=FAST) -> str:
    from prefect.deployments import run_deployment

    with _prefect(config):
        flow_run = run_deployment(DEPLOYMENT, parameters={"config_path": "configs/default.yaml",
                                                          "overrides": list(overrides)}, timeout=0)
    return str(flow_run.id)


def _flow_run(config, flow_run_id: str):
    from prefect.client.orchestration import get_client

    with _prefect(config), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_final(config, flow_run_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _flow_run(config, flow_run_id).state
        if state is not None and state.is_final():
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def _task_running(config, flow_run_id: str, prefix: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _prefect(config), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return any(run.name.startswith(prefix) and run.state is not None and run.state.is_running() for run in runs)


def _as(stack, secret, user):
    password = secret["MLFLOW_AUTH_ADMIN_PASSWORD"] if user == "admin" else secret[stack.password_key(user)]
    return stack.acting_as(user, password)


def _client(stack, config):
    from mlflow import MlflowClient

    return MlflowClient(stack.urls(config)["mlflow"], stack.urls(config)["mlflow"])


def _parent_run(stack, config, secret, flow_run_id: str):
    with _as(stack, secret, "admin"):
        client = _client(stack, config)
        experiment = client.get_experiment_by_name(config["KDSEC_EXPERIMENT"])
        runs = client.search_runs([experiment.experiment_id],
                                  f"tags.`kdsec.prefect_flow_run_id` = '{flow_run_id}'")
    return runs[0] if runs else None


def _kdsec(stack, config, secret, user, *args, cwd=ROOT):
    """The kdsec command as a team member runs it: .stack/env.sh (the URLs and the pipeline's public
    key) and their own credentials."""
    env = {**stack.base_env(), "MLFLOW_TRACKING_URI": stack.urls(config)["mlflow"],
           "PREFECT_API_URL": stack.urls(config)["prefect"], "KDSEC_VERDICT_PUBLIC_KEY": str(stack.signing_key()[1]),
           "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": secret[stack.password_key(user)],
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kdsec.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def _summary(stack, config, secret, run_id: str, folder: Path) -> Summary:
    with _as(stack, secret, "reviewer-b"):
        path = _client(stack, config).download_artifacts(run_id, "summary.json", str(folder))
    return read_summary(Path(path))


# --- the stack -------------------------------------------------------------------------------------


def test_up_again_is_idempotent_and_a_taken_port_is_one_clear_line(team, tmp_path):
    stack, config, _ = team
    started = time.monotonic()
    assert stack.main(["up"]) == 0
    FIGURES["stack up again (s)"] = round(time.monotonic() - started, 1)
    states = stack.status()
    # The HE host waits for a champion (none yet: the first approval comes later, then he-up).
    assert states.pop("he-host").startswith("stopped")
    assert all(state.startswith("running") for state in states.values()), states
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "deployments" / "stack.py"), "up"], capture_output=True,
                                text=True, env={**os.environ, "KDSEC_STACK_DIR": str(tmp_path / "other"),
                                                "KDSEC_PG_PORT": str(port)})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"port {port} (postgres) is taken by another process" in result.stderr
    assert not (tmp_path / "other" / "run").exists()  # nothing was started


def test_the_cron_deployment_creates_scheduled_runs(team):
    stack, config, _ = team
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with _prefect(config), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 2 * * *"
        deadline, scheduled = time.monotonic() + 120, []
        while not scheduled and time.monotonic() < deadline:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))
            time.sleep(2)
    FIGURES["scheduled runs created"] = len(scheduled)
    assert scheduled and all(run.expected_start_time.hour == 2 for run in scheduled)


def test_a_run_killed_mid_audit_is_closed_and_the_rerun_survives_an_mlflow_outage(team, tmp_path):
    stack, config, secret = team
    # 2000 bootstrap resamples per interval keep its audit task running for tens of seconds (the
    # small config's audit takes about a second, shorter than this test's polling): time to kill it there.
    killed = _trigger(config, [*FAST, "audit.bootstrap=2000"])
    deadline = time.monotonic() + 900
    while not _task_running(config, killed, "audit"):
        assert time.monotonic() < deadline, "the run never reached its audit"
        assert not _flow_run(config, killed).state.is_final(), _flow_run(config, killed).state
        time.sleep(1)
    parent = _parent_run(stack, config, secret, killed)
    os.kill(int(parent.data.tags["kdsec.pid"]), signal.SIGKILL)
    state = _wait_final(config, killed, 120)
    assert state.is_crashed(), state  # the worker reports the killed process
    FIGURES["killed run: Prefect state"] = state.name

    # The rerun is asked for by reviewer-a through an authenticated request: the run records who.
    requested = _kdsec(stack, config, secret, "reviewer-a", "trigger", DEPLOYMENT,
                       *[part for item in FAST for part in ("--set", item)])
    assert requested.returncode == 0, requested.stdout + requested.stderr
    found = re.search(r"^Prefect flow run ([0-9a-f-]{36})", requested.stdout, re.MULTILINE)
    assert found and "requested by reviewer-a" in requested.stdout, requested.stdout
    rerun = found.group(1)
    deadline = time.monotonic() + 600
    while _parent_run(stack, config, secret, rerun) is None:  # the rerun is tracking: now take MLflow away
        assert time.monotonic() < deadline and not _flow_run(config, rerun).state.is_final()
        time.sleep(1)
    outage = time.monotonic()
    stack.stop("mlflow-server")
    time.sleep(10)
    stack.mlflow_up(config, secret)
    FIGURES["MLflow outage (s)"] = round(time.monotonic() - outage, 1)
    state = _wait_final(config, rerun)
    assert state.is_completed(), state

    with _as(stack, secret, "admin"):
        closed = _client(stack, config).get_run(parent.info.run_id)
    assert closed.info.status == "FAILED" and "Crashed" in closed.data.tags["kdsec.closed"]
    run = _parent_run(stack, config, secret, rerun)
    summary = _summary(stack, config, secret, run.info.run_id, tmp_path)
    cache = summary.cache
    FIGURES["rerun cache"] = cache
    assert cache["teacher"] == "hit" and cache["signals"]["hit"] == cache["signals"]["total"]
    assert cache["references"]["hit"] == cache["references"]["total"] > 0
    assert summary.verdict == "pass" and summary.registry.awaiting_review
    with _as(stack, secret, "admin"):
        client = _client(stack, config)
        versions = client.search_model_versions(f"name='{config['KDSEC_REGISTERED_MODEL']}'")
        assert [v.tags["kdsec.launched_by"] for v in versions] == ["kdsec-pipeline"]  # the killed run registered none
        aliases = client.get_model_version(config["KDSEC_REGISTERED_MODEL"], versions[0].version).aliases
    assert aliases == ["candidate"]


def test_the_worker_s_runs_train_references_and_evaluate_he_chunks_on_the_stack_s_dask_cluster(team):
    """The runs above (the killed one trained the references, the rerun found them cached and ran
    HE) used the stack's Dask cluster: their compute.dask_address is its scheduler, which ran
    reference and HE-chunk tasks, on the stack's own workers."""
    from distributed import Client

    stack, config, secret = team
    address = stack.dask_address(config)
    with _as(stack, secret, "admin"):
        runs = _client(stack, config).search_runs([_client(stack, config).get_experiment_by_name(
            config["KDSEC_EXPERIMENT"]).experiment_id], "tags.`kdsec.pid` != ''")
    assert runs and {run.data.params.get("compute.dask_address") for run in runs} == {address}
    with Client(address, timeout=10, set_as_default=False) as client:
        workers = sorted(info["name"] for info in client.scheduler_info()["workers"].values())
        prefixes = client.run_on_scheduler(lambda dask_scheduler: {
            name: sum(prefix.states.values()) + len(prefix.all_durations)
            for name, prefix in dask_scheduler.task_prefixes.items()})
    assert workers == stack.dask_workers(config)
    assert {"kdsec-reference-teacher", "kdsec-reference-student", "kdsec-he-chunk"} <= set(prefixes), prefixes
    FIGURES["Dask task prefixes"] = sorted(prefixes)


def test_only_authenticated_reviewers_move_champion_and_never_their_own_run(team, tmp_path):
    stack, config, secret = team
    from mlflow.exceptions import MlflowException

    model = config["KDSEC_REGISTERED_MODEL"]
    with _as(stack, secret, "reviewer-b"):
        version = _client(stack, config).get_model_version_by_alias(model, "candidate")
    with _as(stack, secret, "kdsec-pipeline"), pytest.raises(MlflowException, match="reviewers role"):
        _client(stack, config).set_registered_model_alias(model, "champion", version.version)
    with _as(stack, secret, "kdsec-pipeline"), pytest.raises(MlflowException, match="reviewers role"):
        _client(stack, config).set_model_version_tag(model, version.version, "review.status", "approved")

    # Four-eyes on a pipeline run: reviewer-a triggered it (the rerun above), so reviewer-a may not approve it.
    result = _kdsec(stack, config, secret, "reviewer-a", "review", "approve", version.version, "--comment", "mine")
    assert result.returncode == 1 and "four-eyes: 'reviewer-a' triggered the run" in result.stderr, result.stderr
    with _as(stack, secret, "reviewer-a"), pytest.raises(MlflowException, match="four-eyes"):
        _client(stack, config).set_registered_model_alias(model, "champion", version.version)
    result = _kdsec(stack, config, secret, "reviewer-b", "review", "approve", version.version, "--comment", "read it")
    assert result.returncode == 0 and "by reviewer-b" in result.stdout, result.stdout + result.stderr
    with _as(stack, secret, "reviewer-b"):
        client = _client(stack, config)
        approved = client.get_model_version(model, version.version)
        audit = client.download_artifacts(client.get_run(approved.run_id).data.tags["mlflow.parentRunId"],
                                          "report/audit.json", str(tmp_path))
        assert str(client.get_model_version_by_alias(model, "champion").version) == str(version.version)
        assert "candidate" not in client.get_model_version(model, version.version).aliases
    tags = approved.tags
    assert tags["review.reviewer"] == "reviewer-b" and tags["review.authenticated"] == "true"
    assert tags["review.audit_sha256"] == hashlib.sha256(Path(audit).read_bytes()).hexdigest()
    assert tags["kdsec.triggered_by"] == "reviewer-a"

    # A hand-made version that carries `gates: pass`: a reviewer cannot even register it, and the
    # pipeline identity's can never be promoted, by kdsec or by a direct call to the alias endpoint.
    logged_model = version.source.removeprefix("models:/")
    with _as(stack, secret, "reviewer-b"), pytest.raises(MlflowException, match="only the pipeline identity"):
        _client(stack, config).create_model_version(model, version.source, run_id=version.run_id,
                                                    model_id=logged_model, tags={"gates": "pass"})
    with _as(stack, secret, "kdsec-pipeline"):
        forged = _client(stack, config).create_model_version(
            model, version.source, run_id=version.run_id, model_id=logged_model,
            tags={"gates": "pass", "verdict": "PASSED", "kdsec.launched_by": "kdsec-pipeline"})
    result = _kdsec(stack, config, secret, "reviewer-b", "review", "approve", forged.version)
    assert result.returncode == 1 and "carries no verdict attestation" in result.stderr, result.stderr
    with _as(stack, secret, "reviewer-b"), pytest.raises(MlflowException, match="carries no verdict attestation"):
        _client(stack, config).set_registered_model_alias(model, "champion", forged.version)
    with _as(stack, secret, "reviewer-b"):
        client = _client(stack, config)
        assert str(client.get_model_version_by_alias(model, "champion").version) == str(version.version)
        assert not any(key.startswith("review.") for key in client.get_model_version(model, forged.version).tags)


def test_a_reviewer_reads_the_champion_report_through_the_server(team, tmp_path):
    stack, config, secret = team
    result = _kdsec(stack, config, secret, "reviewer-b", "report", "champion", "--out", str(tmp_path / "reports"))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("report.html", "audit.json", "summary.json"):
        assert list((tmp_path / "reports").rglob(name)), name
    with _as(stack, secret, "reviewer-b"):
        client = _client(stack, config)
        champion = client.get_model_version_by_alias(config["KDSEC_REGISTERED_MODEL"], "champion")
        parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server, proxied


def test_the_he_host_serves_the_champion_to_token_holders_only(team, tmp_path):
    """The stack's HE host (he_service.py) on the champion: a client's provisioned token gets an
    encrypted round trip that agrees with the champion in plaintext; no token is 401, a revoked
    one 403, and the next provisioning hands out a new one."""
    import stat
    import urllib.error
    import urllib.request

    import he_service
    import numpy as np

    from kdsec import tracking
    from kdsec.compress import load_weights
    from kdsec.config import load_config
    from kdsec.data import prepare_data
    from kdsec.he import he_ops, plaintext_forward
    from kdsec.he.client import HEHttpClient

    stack, config, secret = team
    started = time.monotonic()
    he_service.he_up(config, secret)
    FIGURES["HE host up (s)"] = round(time.monotonic() - started, 1)
    client_file = stack.state_dir() / "users" / f"{he_service.clients(config)[0]}.he.env"
    assert stat.S_IMODE(client_file.stat().st_mode) == 0o600
    values = dict(line.removeprefix("export ").split("=", 1) for line in client_file.read_text().splitlines())
    url, token = values["KDSEC_HE_URL"], values["KDSEC_HE_TOKEN"]
    assert token not in he_service.token_store().read_text()  # the store holds hashes only
    request = urllib.request.Request(f"{url}/sessions", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    images = prepare_data(load_config(None, list(FAST)).data).x_test[:3]
    started = time.monotonic()
    with HEHttpClient(url, path="single", token=token) as client:  # one sample per request: within the budget
        logits = client.predict_logits(images)
    FIGURES["HE single round trip, 3 images (s)"] = round(time.monotonic() - started, 1)
    import mlflow

    before = mlflow.get_tracking_uri()
    try:
        with _as(stack, secret, "reviewer-b"):
            mlflow.set_tracking_uri(stack.urls(config)["mlflow"])
            name, version = tracking.resolve_version(f"models:/{config['KDSEC_REGISTERED_MODEL']}@champion")
            checkpoint = tracking.download_version_checkpoint(name, version, tmp_path)
    finally:
        mlflow.set_tracking_uri(before)
    plain = plaintext_forward(he_ops(load_weights(checkpoint)[0]), images)
    assert np.abs(logits - plain).max() < 1e-2 and (logits.argmax(1) == plain.argmax(1)).all()
    token_id = token.split("_")[1]
    revoke = _kdsec(stack, config, secret, "reviewer-b", "he-token", "revoke", token_id, "--store",
                    str(he_service.token_store()))
    assert revoke.returncode == 0, revoke.stdout + revoke.stderr
    with pytest.raises(Exception, match=r"\(403\): token [0-9a-f]+ was revoked"):
        HEHttpClient(url, path="single", token=token)
    assert he_service.provision_tokens(config) == [he_service.clients(config)[0]]
    assert token not in client_file.read_text()


def test_two_runs_at_once_on_the_server_register_distinct_versions_and_the_later_wins(team):
    stack, config, secret = team
    first = _trigger(config)
    time.sleep(3)
    second = _trigger(config)
    started = time.monotonic()
    states = [_wait_final(config, first), _wait_final(config, second)]
    FIGURES["two concurrent server runs (s)"] = round(time.monotonic() - started, 1)
    assert all(state.is_completed() for state in states), states
    runs = [_parent_run(stack, config, secret, flow_run) for flow_run in (first, second)]
    later = max(runs, key=lambda run: run.info.start_time)
    with _as(stack, secret, "reviewer-b"):
        client = _client(stack, config)
        parents = {run.info.run_id for run in runs}
        ours = [v for v in client.search_model_versions(f"name='{config['KDSEC_REGISTERED_MODEL']}'")
                if client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") in parents]
        candidate = client.get_model_version_by_alias(config["KDSEC_REGISTERED_MODEL"], "candidate")
        assert len({v.version for v in ours}) == 2
        assert client.get_run(candidate.run_id).data.tags["mlflow.parentRunId"] == later.info.run_id


def test_two_runs_at_once_on_the_local_sqlite_default(tmp_path):
    """No server: two `kdsec run`s in one working directory share ./mlflow.db and the cache."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_TRACKING_", "PREFECT_API_URL", "KDSEC_"))}
    env["COLUMNS"] = "200"
    args = [sys.executable, "-m", "kdsec.cli", "run"] + [part for item in SMALL_OVERRIDES for part in ("--set", item)]
    started = time.monotonic()
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    second = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [process.communicate(timeout=900)[0] for process in (first, second)]
    FIGURES["two concurrent local runs (s)"] = round(time.monotonic() - started, 1)
    assert [first.returncode, second.returncode] == [0, 0], [out[-1500:] for out in outputs]
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    versions = client.search_model_versions("name='kdsec-student'")
    assert len({v.version for v in versions}) == 2
    champion = client.get_model_version_by_alias("kdsec-student", "champion")
    parents = {v.version: client.get_run(client.get_run(v.run_id).data.tags["mlflow.parentRunId"]) for v in versions}
    later = max(parents, key=lambda version: parents[version].info.start_time)
    assert str(champion.version) == str(later)
