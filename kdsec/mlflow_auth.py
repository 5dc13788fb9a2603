"""The team stack's MLflow server plugin: basic-auth plus kdsec's review rules, enforced by the
server (``mlflow server --app-name basic-auth`` with ``authorization_function =
kdsec.mlflow_auth:authenticate`` in its auth config).

MLflow's permissions cannot tell "may register versions" from "may move an alias" on one
registered model (both need EDIT), so on top of basic-auth this refuses, for every non-admin user:

- moving or deleting a reviewed alias (``KDSEC_REVIEWED_ALIASES``, default ``champion``) unless
  the user holds the reviewers role (``KDSEC_REVIEWERS_ROLE``, default ``kdsec-reviewers``);
- moving it to a version without the pipeline's verdict attestation that says pass, signed by the
  key whose public half is ``KDSEC_VERDICT_PUBLIC_KEY`` (no key configured: every move is refused);
- with four-eyes on (``KDSEC_FOUR_EYES``, default on), moving it to a version whose attested run
  the user launched or triggered, or whose trigger is unknown;
- writing the pipeline's version tags (``gates``, ``gate.*``, ``verdict``, the attestation, the
  trigger, the run start) as anyone but the pipeline identity (``KDSEC_PIPELINE_USER``);
- writing a ``kdsec.launched_by`` tag other than the caller's own name (so the tag is proof of
  who registered the version), and writing ``review.*`` tags without the reviewers role (the
  pipeline may only mark a version ``review.status=pending``);
- on runs, a ``kdsec.triggered_by`` tag other than the caller's own name, any later change to a
  run request's tags, and a claim of a request by anyone but the pipeline, or of one already claimed.

Parameters are read as MLflow's own handlers read them: the URL and, for anything but GET, the
body whatever its content type (a DELETE with a text/plain body is parsed as JSON by MLflow).

Runs inside the MLflow server process (Flask); nothing else in kdsec imports it.
"""

from __future__ import annotations

import json
import os
import threading

from flask import Response, make_response, request
from mlflow.server.auth import authenticate_request_basic_auth, store
from werkzeug.datastructures import Authorization

from kdsec.crypto import attestation
from kdsec.errors import KdsecError

LAUNCHED_BY = "kdsec.launched_by"
REVIEW_PREFIX = "review."
PENDING = ("review.status", "pending")  # what the pipeline writes when a version waits for review
# Version tags only the pipeline writes: its verdict for people to read, its signed verdict, and
# what orders concurrent runs. (Only the attestation decides a promotion; the rest must not lie.)
PIPELINE_TAGS = frozenset({"gates", "verdict", attestation.TAG, "kdsec.triggered_by", "kdsec.run_started"})
PIPELINE_PREFIXES = ("gate.",)
TRIGGERED_BY = "kdsec.triggered_by"
REQUEST_PREFIX = "kdsec.request."
CLAIMED_BY = "kdsec.request.claimed_by"
_claims = threading.Lock()  # one claim of a run request at a time (the server runs one worker process)


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _refuse(message: str) -> Response:
    response = make_response(json.dumps({"error_code": "PERMISSION_DENIED", "message": message}), 403)
    response.headers["Content-Type"] = "application/json"
    return response


def _params() -> dict:
    """The request's parameters as MLflow's handlers see them: the body (any content type) over the URL's."""
    merged = dict(request.args)
    if request.method != "GET":
        body = request.get_json(force=True, silent=True)
        if isinstance(body, dict):
            merged.update(body)
    return merged


def _named_aliases() -> set[str]:
    """Every alias the request names, in the URL or the body: a rule must hold whichever MLflow reads."""
    names = {str(value) for value in request.args.getlist("alias")}
    body = request.get_json(force=True, silent=True) if request.method != "GET" else None
    if isinstance(body, dict) and "alias" in body:
        names.add(str(body["alias"]))
    return names


def _is_reviewer(username: str) -> bool:
    role = _setting("KDSEC_REVIEWERS_ROLE", "kdsec-reviewers")
    user = store.get_user(username)
    return any(assigned.name == role for assigned in store.list_user_roles(user.id))


def _is_pipeline(username: str) -> bool:
    return username == _setting("KDSEC_PIPELINE_USER", "kdsec-pipeline")


def _pipeline_tag(key: str) -> bool:
    return key in PIPELINE_TAGS or key.startswith(PIPELINE_PREFIXES)


def _request_tag(key: str) -> bool:
    return key == TRIGGERED_BY or key.startswith(REQUEST_PREFIX)


def _promotion_refusal(username: str, name: str, version: str) -> str | None:
    """Why ``username`` may not move a reviewed alias to ``version`` of ``name``: the attested verdict
    and, with four-eyes, who launched and triggered its run."""
    from mlflow.server.handlers import _get_model_registry_store

    try:
        details = _get_model_registry_store().get_model_version(name, str(version))
    except Exception:  # noqa: BLE001 — an unknown version: let MLflow's own handler answer
        return None
    try:
        trusted = attestation.configured_key()
        if trusted is None:
            return (f"the server has no {attestation.PUBLIC_KEY_ENV}: no verdict can be verified, so no version "
                    "can be promoted")
        verdict = attestation.verify(details.tags.get(attestation.TAG), trusted, model=name,
                                     version=str(details.version), source=details.source,
                                     run_id=details.run_id or "")
    except KdsecError as exc:
        return str(exc)
    if not verdict.passed:
        failed = ", ".join(sorted(gate for gate, result in verdict.gates.items() if result != "pass")) or "none"
        return f"version {version} did not pass its gates (the pipeline attested: {failed} failed)"
    if _setting("KDSEC_FOUR_EYES", "1") in ("0", "false", "off"):
        return None
    if verdict.triggered_by is None:
        return (f"four-eyes: nobody is known to have triggered the run behind version {version} "
                f"({verdict.trigger}); trigger runs with kdsec trigger")
    if username in (verdict.launched_by, verdict.triggered_by, details.tags.get(LAUNCHED_BY)):
        return f"four-eyes: '{username}' launched or triggered the run behind version {version} and cannot approve it"
    return None


def _run_tags(run_id: str) -> dict[str, str] | None:
    from mlflow.server.handlers import _get_tracking_store

    try:
        return dict(_get_tracking_store().get_run(run_id).data.tags)
    except Exception:  # noqa: BLE001 — an unknown run: let MLflow's own handler answer
        return None


def _run_rules(username: str, path: str, params: dict) -> Response | None:
    """Run requests: who asked is the caller, a request never changes, and only the pipeline claims it, once."""
    if path.endswith("/mlflow/runs/create") and request.method == "POST":
        for tag in params.get("tags") or []:
            key = str(tag.get("key", "")) if isinstance(tag, dict) else ""
            if key == TRIGGERED_BY and tag.get("value") != username:
                return _refuse(f"{TRIGGERED_BY} may only name the caller ('{username}')")
            if key == CLAIMED_BY:
                return _refuse("a run request cannot be created already claimed")
        return None
    if path.endswith("/mlflow/runs/log-batch") and request.method == "POST":
        keys = [str(tag.get("key", "")) for tag in params.get("tags") or [] if isinstance(tag, dict)]
        if any(_request_tag(key) for key in keys):
            return _refuse("a run request's tags are written when it is created, never after")
        return None
    if path.endswith("/mlflow/runs/delete-tag") and request.method == "POST":
        if _request_tag(str(params.get("key", ""))):
            return _refuse(f"'{username}' may not delete {params.get('key')}")
        return None
    if path.endswith("/mlflow/runs/set-tag") and request.method == "POST":
        key = str(params.get("key", ""))
        if not _request_tag(key):
            return None
        if key != CLAIMED_BY:
            return _refuse("a run request's tags are written when it is created, never after")
        if not _is_pipeline(username):
            return _refuse(f"only the pipeline identity may claim a run request ('{username}' is not)")
        with _claims:
            tags = _run_tags(str(params.get("run_id") or params.get("run_uuid") or ""))
            if tags is not None and tags.get(CLAIMED_BY):
                return _refuse(f"this run request already started flow run {tags[CLAIMED_BY]}")
            if tags is not None and not tags.get(TRIGGERED_BY):
                return _refuse("this run is not a run request (it names no one who asked)")
        return None
    return None


def _review_rules(username: str) -> Response | None:
    path = request.path
    params = _params()
    reviewed = {alias.strip() for alias in _setting("KDSEC_REVIEWED_ALIASES", "champion").split(",") if alias.strip()}
    if path.endswith("/mlflow/registered-models/alias") and request.method in ("POST", "DELETE"):
        named = _named_aliases() & reviewed
        if not named:
            return None
        if not _is_reviewer(username):
            return _refuse(f"only members of the reviewers role may move '{sorted(named)[0]}' "
                           f"('{username}' is not); use kdsec review approve as a reviewer")
        if request.method == "POST":
            refusal = _promotion_refusal(username, str(params.get("name", "")), str(params.get("version", "")))
            if refusal:
                return _refuse(refusal)
        return None
    if path.endswith("/mlflow/model-versions/set-tag") and request.method == "POST":
        key, value = str(params.get("key", "")), str(params.get("value", ""))
        if _pipeline_tag(key) and not _is_pipeline(username):
            return _refuse(f"only the pipeline identity writes {key} ('{username}' is not)")
        if key == LAUNCHED_BY and value != username:
            return _refuse(f"{LAUNCHED_BY} may only name the caller ('{username}')")
        if key.startswith(REVIEW_PREFIX) and (key, value) != PENDING and not _is_reviewer(username):
            return _refuse(f"only members of the reviewers role may set {key}")
        return None
    if path.endswith("/mlflow/model-versions/delete-tag") and request.method == "DELETE":
        key = str(params.get("key", ""))
        if key == LAUNCHED_BY or _pipeline_tag(key) or (key.startswith(REVIEW_PREFIX) and not _is_reviewer(username)):
            return _refuse(f"'{username}' may not delete {key}")
        return None
    if path.endswith("/mlflow/model-versions/create") and request.method == "POST":
        for tag in params.get("tags") or []:
            key = str(tag.get("key", "")) if isinstance(tag, dict) else ""
            if key == LAUNCHED_BY and tag.get("value") != username:
                return _refuse(f"{LAUNCHED_BY} may only name the caller ('{username}')")
            if _pipeline_tag(key) and not _is_pipeline(username):
                return _refuse(f"only the pipeline identity registers versions with {key} ('{username}' is not)")
            if key.startswith(REVIEW_PREFIX) and (key, tag.get("value")) != PENDING:
                return _refuse("a new version cannot carry review decisions")
        return None
    return _run_rules(username, path, params)


def authenticate() -> Authorization | Response:
    """MLflow's basic-auth check, then kdsec's review rules (admins are exempt: break-glass)."""
    authorization = authenticate_request_basic_auth()
    if isinstance(authorization, Response):
        return authorization
    if store.get_user(authorization.username).is_admin:
        return authorization
    return _review_rules(authorization.username) or authorization
