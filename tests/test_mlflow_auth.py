"""The review rules as the team's MLflow server enforces them: a real ``mlflow server --app-name
basic-auth`` with kdsec's plugin (SQLite stores, loopback), users and the reviewers role provisioned
as the team stack does, and every request sent over REST as one of its users.

A version becomes champion only with the pipeline's signed verdict that says pass, never by a
reviewer who launched or triggered its run; tags and requests cannot be forged around that.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests

from kdsec.crypto.keys import generate_key_file, load_or_create_signer, public_key_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deployments"))
import stack  # noqa: E402

MODEL = "kdsec-student"
PIPELINE, REVIEWER_A, REVIEWER_B, OWNER = "kdsec-pipeline", "reviewer-a", "reviewer-b", "model-owner"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-auth")
    key = generate_key_file(folder / "keys" / "pipeline.pem", "signing")
    port = _free_port()
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = kdsec.mlflow_auth:authenticate\ngrant_default_workspace_access = false\n")
    config = {**stack.settings(), "KDSEC_REVIEWERS": f"{REVIEWER_A},{REVIEWER_B}"}
    secret = {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-0123",
              **{stack.password_key(user): f"password-of-{user}" for user in (*stack.users(config), OWNER)}}
    env = {**stack.base_env(), "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-0123456789",
           "KDSEC_VERDICT_PUBLIC_KEY": str(public_key_path(key)), "KDSEC_PIPELINE_USER": PIPELINE,
           **{name: config[name] for name in ("KDSEC_REVIEWERS_ROLE", "KDSEC_REVIEWED_ALIASES", "KDSEC_FOUR_EYES")}}
    log = (folder / "server.log").open("wb")
    process = subprocess.Popen([str(stack.BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)
        stack.provision(config, secret, mlflow_url=url)
        from mlflow.server.auth.client import AuthServiceClient

        with stack.acting_as("admin", secret["MLFLOW_AUTH_ADMIN_PASSWORD"]):
            auth = AuthServiceClient(url)
            auth.create_user(OWNER, secret[stack.password_key(OWNER)])
            # MANAGE on the model (may delete aliases in MLflow's own eyes) but not a reviewer.
            auth.grant_user_permission(OWNER, "registered_model", MODEL, "MANAGE")
        yield url, secret, load_or_create_signer("KDSEC_TEST_UNSET", key)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
        log.close()


def _rest(server, user, method, endpoint, **kwargs) -> requests.Response:
    url, secret, _ = server
    return requests.request(method, f"{url}/api/2.0/mlflow/{endpoint}", timeout=30,
                            auth=(user, secret[stack.password_key(user)]), **kwargs)


def _ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _refused(response: requests.Response, message: str) -> None:
    assert response.status_code == 403 and message in response.json()["message"], response.text


def _version(server, tags: dict[str, str], user: str = PIPELINE) -> dict:
    """A version registered by ``user`` from a new run of the experiment, with ``tags``."""
    experiment = _ok(_rest(server, user, "GET", "experiments/get-by-name",
                           params={"experiment_name": "kdsec"}))["experiment"]["experiment_id"]
    run = _ok(_rest(server, user, "POST", "runs/create", json={"experiment_id": experiment}))["run"]["info"]
    body = {"name": MODEL, "source": f"mlflow-artifacts:/{experiment}/{run['run_id']}/artifacts/model",
            "run_id": run["run_id"],
            "tags": [{"key": k, "value": v} for k, v in {"kdsec.launched_by": user, **tags}.items()]}
    return _ok(_rest(server, user, "POST", "model-versions/create", json=body))["model_version"]


def _attest(server, version: dict, passed: bool, triggered_by: str | None) -> None:
    """The pipeline's signed verdict on ``version``, written as the pipeline writes it."""
    from kdsec.crypto import attestation

    verdict = attestation.Verdict(model=MODEL, version=str(version["version"]), source=version["source"],
                                  run_id=version["run_id"], pipeline_run=version["run_id"], audit_sha256="0" * 64,
                                  model_sha256="0" * 64,
                                  gates={"accuracy": "pass", "membership": "pass" if passed else "fail"},
                                  verdict="pass" if passed else "fail", launched_by=PIPELINE,
                                  triggered_by=triggered_by, trigger="request:test")
    _ok(_rest(server, PIPELINE, "POST", "model-versions/set-tag", json={
        "name": MODEL, "version": str(version["version"]), "key": attestation.TAG,
        "value": attestation.sign(verdict, server[2])}))


def _move_champion(server, user, version) -> requests.Response:
    return _rest(server, user, "POST", "registered-models/alias",
                 json={"name": MODEL, "alias": "champion", "version": str(version["version"])})


def _champion(server) -> str | None:
    found = _rest(server, REVIEWER_B, "GET", "registered-models/alias", params={"name": MODEL, "alias": "champion"})
    return str(found.json()["model_version"]["version"]) if found.status_code == 200 else None


def test_a_hand_made_or_re_tagged_version_never_becomes_champion_even_for_a_reviewer(server):
    hand_made = _version(server, {"gates": "pass", "verdict": "PASSED", "gate.accuracy": "pass"})
    _refused(_move_champion(server, REVIEWER_B, hand_made), "carries no verdict attestation")
    failed = _version(server, {"gates": "fail"})
    _attest(server, failed, passed=False, triggered_by=REVIEWER_A)
    _ok(_rest(server, PIPELINE, "POST", "model-versions/set-tag",  # re-tagged after the fact
              json={"name": MODEL, "version": str(failed["version"]), "key": "gates", "value": "pass"}))
    _refused(_move_champion(server, REVIEWER_B, failed), "did not pass its gates (the pipeline attested: membership")
    # An attestation copied from a passing version onto another speaks of the wrong version.
    passing = _version(server, {"gates": "pass"})
    _attest(server, passing, passed=True, triggered_by=REVIEWER_A)
    from kdsec.crypto import attestation

    copied = _ok(_rest(server, REVIEWER_B, "GET", "model-versions/get",
                       params={"name": MODEL, "version": str(passing["version"])}))["model_version"]
    value = next(tag["value"] for tag in copied["tags"] if tag["key"] == attestation.TAG)
    _ok(_rest(server, PIPELINE, "POST", "model-versions/set-tag", json={
        "name": MODEL, "version": str(failed["version"]), "key": attestation.TAG, "value": value}))
    _refused(_move_champion(server, REVIEWER_B, failed), "speaks of version")
    assert _champion(server) is None


def test_only_the_pipeline_writes_verdict_tags(server):
    version = _version(server, {"gates": "fail"})
    for user in (REVIEWER_B, OWNER):
        for key in ("gates", "verdict", "gate.membership", "kdsec.attestation", "kdsec.triggered_by"):
            _refused(_rest(server, user, "POST", "model-versions/set-tag", json={
                "name": MODEL, "version": str(version["version"]), "key": key, "value": "pass"}), "only the pipeline")
            _refused(_rest(server, user, "DELETE", "model-versions/delete-tag", json={
                "name": MODEL, "version": str(version["version"]), "key": key}), "may not delete")
    _refused(_rest(server, REVIEWER_B, "POST", "model-versions/create", json={
        "name": MODEL, "source": version["source"], "run_id": version["run_id"],
        "tags": [{"key": "gates", "value": "pass"}]}), "only the pipeline identity registers versions with gates")


def test_four_eyes_holds_for_the_reviewer_who_triggered_the_run(server):
    version = _version(server, {"gates": "pass"})
    _attest(server, version, passed=True, triggered_by=REVIEWER_A)
    _refused(_move_champion(server, REVIEWER_A, version), "four-eyes: 'reviewer-a' triggered the run")
    _refused(_move_champion(server, PIPELINE, version), "only members of the reviewers role")
    unknown = _version(server, {"gates": "pass"})
    _attest(server, unknown, passed=True, triggered_by=None)
    _refused(_move_champion(server, REVIEWER_B, unknown), "nobody is known to have triggered")
    _ok(_move_champion(server, REVIEWER_B, version))
    assert _champion(server) == str(version["version"])


def test_a_non_reviewer_cannot_delete_champion_by_hiding_the_alias_in_a_text_body(server):
    if _champion(server) is None:
        version = _version(server, {"gates": "pass"})
        _attest(server, version, passed=True, triggered_by=REVIEWER_A)
        _ok(_move_champion(server, REVIEWER_B, version))
    holder = _champion(server)
    # MLflow's handler parses a DELETE body as JSON whatever its content type; the URL names no alias.
    sneaky = _rest(server, OWNER, "DELETE", "registered-models/alias", params={"name": MODEL},
                   data='{"name": "kdsec-student", "alias": "champion"}', headers={"Content-Type": "text/plain"})
    _refused(sneaky, "only members of the reviewers role may move 'champion'")
    _refused(_rest(server, OWNER, "DELETE", "registered-models/alias", params={"name": MODEL, "alias": "champion"}),
             "only members of the reviewers role")
    # MLflow decodes a JSON string body a second time: the alias may hide one level deeper.
    hidden = json.dumps(json.dumps({"name": MODEL, "alias": "champion"}))
    _refused(_rest(server, OWNER, "DELETE", "registered-models/alias", params={"name": MODEL, "alias": "x"},
                   data=hidden, headers={"Content-Type": "text/plain"}), "the URL and the body disagree on 'alias'")
    _refused(_rest(server, OWNER, "DELETE", "registered-models/alias", data=hidden,
                   headers={"Content-Type": "text/plain"}), "only members of the reviewers role may move 'champion'")
    _refused(_rest(server, OWNER, "DELETE", "registered-models/alias", params={"name": MODEL},
                   data='[{"alias": "champion"}]', headers={"Content-Type": "text/plain"}), "one JSON object")
    hidden_tag = json.dumps(json.dumps({"name": MODEL, "version": holder, "key": "kdsec.attestation"}))
    _refused(_rest(server, OWNER, "DELETE", "model-versions/delete-tag", data=hidden_tag,
                   headers={"Content-Type": "text/plain"}), "may not delete kdsec.attestation")
    assert _champion(server) == holder


def test_a_run_request_names_its_caller_never_changes_and_is_claimed_once_by_the_pipeline(server):
    experiment = _ok(_rest(server, REVIEWER_A, "GET", "experiments/get-by-name",
                           params={"experiment_name": "kdsec"}))["experiment"]["experiment_id"]
    _refused(_rest(server, REVIEWER_B, "POST", "runs/create", json={
        "experiment_id": experiment, "tags": [{"key": "kdsec.triggered_by", "value": REVIEWER_A}]}),
        "may only name the caller")
    request = _ok(_rest(server, REVIEWER_A, "POST", "runs/create", json={
        "experiment_id": experiment, "tags": [{"key": "kdsec.triggered_by", "value": REVIEWER_A},
                                              {"key": "kdsec.request.config_path", "value": "configs/default.yaml"},
                                              {"key": "kdsec.request.overrides", "value": "[]"}]}))["run"]["info"]
    run_id = request["run_id"]
    for user in (REVIEWER_A, REVIEWER_B):
        _refused(_rest(server, user, "POST", "runs/set-tag", json={
            "run_id": run_id, "key": "kdsec.request.overrides", "value": '["gates.min_accuracy=0"]'}), "never after")
        _refused(_rest(server, user, "POST", "runs/log-batch", json={
            "run_id": run_id, "tags": [{"key": "kdsec.triggered_by", "value": user}]}), "never after")
        _refused(_rest(server, user, "POST", "runs/delete-tag", json={"run_id": run_id, "key": "kdsec.triggered_by"}),
                 "may not delete")
        _refused(_rest(server, user, "POST", "runs/set-tag", json={
            "run_id": run_id, "key": "kdsec.request.claimed_by", "value": "flow-x"}), "only the pipeline identity")
    _ok(_rest(server, PIPELINE, "POST", "runs/set-tag", json={
        "run_id": run_id, "key": "kdsec.request.claimed_by", "value": "flow-1"}))
    _refused(_rest(server, PIPELINE, "POST", "runs/set-tag", json={
        "run_id": run_id, "key": "kdsec.request.claimed_by", "value": "flow-2"}), "already started flow run flow-1")


def test_the_pipeline_claims_a_request_through_kdsec_and_a_replay_is_one_line(server, monkeypatch):
    from kdsec import tracking
    from kdsec.errors import KdsecError

    url, secret, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with stack.acting_as(REVIEWER_A, secret[stack.password_key(REVIEWER_A)]):
        request, asker = tracking.create_run_request("kdsec", "kd-pipeline/nightly", "configs/default.yaml",
                                                     ["seed=3"])
    assert asker == REVIEWER_A
    with stack.acting_as(PIPELINE, secret[stack.password_key(PIPELINE)]):
        tracking.connect()
        trigger = tracking.claim_run_request(request, "flow-a")
        assert trigger == {"kind": f"request:{request}", "by": REVIEWER_A, "config_path": "configs/default.yaml",
                           "overrides": ["seed=3"]}
        assert tracking.claim_run_request(request, "flow-a")["by"] == REVIEWER_A  # a retry finds its own claim
        with pytest.raises(KdsecError, match="already started flow run flow-a"):
            tracking.claim_run_request(request, "flow-b")
