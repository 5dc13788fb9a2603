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

Parameters are read as MLflow's own handlers read them: the URL for GET, else the body whatever its
content type, a JSON string decoded twice (MLflow parses a DELETE's text/plain body as JSON, and
decodes a double-encoded one). A body MLflow would read otherwise, or a URL that disagrees with
the body, is refused.

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
PIPELINE_TAGS = frozenset({"gates", "verdict", attestation.TAG, attestation.TRIGGERED_BY, "kdsec.run_started"})
PIPELINE_PREFIXES = ("gate.",)
# The endpoints these rules speak of (REST and the UI's ajax-api alike); every other passes through.
GUARDED = ("/mlflow/registered-models/alias", "/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag",
           "/mlflow/model-versions/create", "/mlflow/runs/create", "/mlflow/runs/log-batch", "/mlflow/runs/delete-tag",
           "/mlflow/runs/set-tag")
_claims = threading.Lock()  # claims of run requests: checked and written under it, one at a time


class _Unreadable(Exception):
    """A request MLflow could read differently from these rules: refused, never guessed at."""


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _respond(status: int, document: dict) -> Response:
    response = make_response(json.dumps(document), status)
    response.headers["Content-Type"] = "application/json"
    return response


def _refuse(message: str) -> Response:
    return _respond(403, {"error_code": "PERMISSION_DENIED", "message": message})


def _body() -> dict:
    """A non-GET request's body as MLflow's handlers read it: JSON whatever the content type, a JSON
    string decoded a second time (older clients double-encode), nothing when empty."""
    if not request.get_data(cache=True):
        return {}
    body = request.get_json(force=True, silent=True)
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        raise _Unreadable("the request body must be one JSON object")
    return body


def _params() -> dict:
    """The request's parameters as MLflow's handlers see them: the URL for GET, else the body. A
    non-GET URL must agree with the body: MLflow's own permission check reads the URL of a DELETE
    without a JSON content type, while its handler acts on the body."""
    if request.method == "GET":
        return dict(request.args)
    body = _body()
    if not body:
        return dict(request.args)
    for key in request.args:
        if key not in body or request.args.getlist(key) != [str(body[key])]:
            raise _Unreadable(f"the URL and the body disagree on '{key}'")
    return body


def _is_reviewer(username: str) -> bool:
    role = _setting("KDSEC_REVIEWERS_ROLE", "kdsec-reviewers")
    user = store.get_user(username)
    return any(assigned.name == role for assigned in store.list_user_roles(user.id))


def _is_pipeline(username: str) -> bool:
    return username == _setting("KDSEC_PIPELINE_USER", "kdsec-pipeline")


def _pipeline_tag(key: str) -> bool:
    return key in PIPELINE_TAGS or key.startswith(PIPELINE_PREFIXES)


def _request_tag(key: str) -> bool:
    return key == attestation.TRIGGERED_BY or key.startswith(attestation.REQUEST_PREFIX)


def _promotion_refusal(username: str, name: str, version: str) -> str | None:
    """Why ``username`` may not move a reviewed alias to ``version`` of ``name``: the attested verdict
    and, with four-eyes, who launched and triggered its run."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_model_registry_store

    try:
        details = _get_model_registry_store().get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # MLflow's own handler answers 404
        return f"version {version} of '{name}' could not be read to check its verdict"
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
    four_eyes = _setting("KDSEC_FOUR_EYES", "1") not in ("0", "false", "off")
    return attestation.refusal(verdict, username, four_eyes, details.tags.get(LAUNCHED_BY))


def _claim(username: str, params: dict) -> Response:
    """A run request's claim, checked and written under one lock (two claims cannot both pass): only
    the pipeline identity claims, only a request, only once. The plugin writes it and answers."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_tracking_store

    if not _is_pipeline(username):
        return _refuse(f"only the pipeline identity may claim a run request ('{username}' is not)")
    run_id, value = str(params.get("run_id") or params.get("run_uuid") or ""), str(params.get("value", ""))
    tracking_store = _get_tracking_store()
    with _claims:
        try:
            tags = dict(tracking_store.get_run(run_id).data.tags)
        except MlflowException:
            return _refuse(f"run request '{run_id[:40]}' does not exist")
        if not tags.get(attestation.TRIGGERED_BY):
            return _refuse("this run is not a run request (it names no one who asked)")
        if tags.get(attestation.CLAIMED_BY):
            return _refuse(f"this run request already started flow run {tags[attestation.CLAIMED_BY]}")
        tracking_store.set_tag(run_id, RunTag(attestation.CLAIMED_BY, value))
    return _respond(200, {})


def _run_rules(username: str, path: str, params: dict) -> Response | None:
    """Run requests: who asked is the caller, a request never changes, and only the pipeline claims it, once."""
    if path.endswith("/mlflow/runs/create") and request.method == "POST":
        for tag in params.get("tags") or []:
            key = str(tag.get("key", "")) if isinstance(tag, dict) else ""
            if key == attestation.TRIGGERED_BY and tag.get("value") != username:
                return _refuse(f"{attestation.TRIGGERED_BY} may only name the caller ('{username}')")
            if key == attestation.CLAIMED_BY:
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
        if key != attestation.CLAIMED_BY:
            return _refuse("a run request's tags are written when it is created, never after")
        return _claim(username, params)
    return None


def _review_rules(username: str) -> Response | None:
    path = request.path
    if not path.endswith(GUARDED):
        return None
    try:
        params = _params()
    except _Unreadable as exc:
        return _refuse(f"{exc} (kdsec review rules)")
    reviewed = {alias.strip() for alias in _setting("KDSEC_REVIEWED_ALIASES", "champion").split(",") if alias.strip()}
    if path.endswith("/mlflow/registered-models/alias") and request.method in ("POST", "DELETE"):
        alias = str(params.get("alias", ""))
        if alias not in reviewed:
            return None
        if not _is_reviewer(username):
            return _refuse(f"only members of the reviewers role may move '{alias}' "
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
