"""The team stack's MLflow server plugin: basic-auth plus kdsec's review rules, enforced by the
server (``mlflow server --app-name basic-auth`` with ``authorization_function =
kdsec.mlflow_auth:authenticate`` in its auth config).

MLflow's permissions cannot tell "may register versions" from "may move an alias" on one
registered model (both need EDIT), so on top of basic-auth this refuses, for every non-admin user:

- moving or deleting a reviewed alias (``KDSEC_REVIEWED_ALIASES``, default ``champion``) unless
  the user holds the reviewers role (``KDSEC_REVIEWERS_ROLE``, default ``kdsec-reviewers``);
- with four-eyes on (``KDSEC_FOUR_EYES``, default on), moving it to a version whose
  ``kdsec.launched_by`` tag names the same user, or that has no such tag;
- writing a ``kdsec.launched_by`` tag other than the caller's own name (so the tag is proof of
  who registered the version), and writing ``review.*`` tags without the reviewers role (the
  pipeline may only mark a version ``review.status=pending``).

Runs inside the MLflow server process (Flask); nothing else in kdsec imports it.
"""

from __future__ import annotations

import json
import os

from flask import Response, make_response, request
from mlflow.server.auth import authenticate_request_basic_auth, store
from werkzeug.datastructures import Authorization

LAUNCHED_BY = "kdsec.launched_by"
REVIEW_PREFIX = "review."
PENDING = ("review.status", "pending")  # what the pipeline writes when a version waits for review


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _refuse(message: str) -> Response:
    response = make_response(json.dumps({"error_code": "PERMISSION_DENIED", "message": message}), 403)
    response.headers["Content-Type"] = "application/json"
    return response


def _params() -> dict:
    if request.method == "GET" or (request.method == "DELETE" and not request.is_json):
        return dict(request.args)
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _is_reviewer(username: str) -> bool:
    role = _setting("KDSEC_REVIEWERS_ROLE", "kdsec-reviewers")
    user = store.get_user(username)
    return any(assigned.name == role for assigned in store.list_user_roles(user.id))


def _version_launcher(name: str, version: str) -> str | None:
    from mlflow.server.handlers import _get_model_registry_store

    try:
        return _get_model_registry_store().get_model_version(name, str(version)).tags.get(LAUNCHED_BY)
    except Exception:  # noqa: BLE001 — an unknown version: let MLflow's own handler answer
        return None


def _review_rules(username: str) -> Response | None:
    path = request.path
    params = _params()
    reviewed = {alias.strip() for alias in _setting("KDSEC_REVIEWED_ALIASES", "champion").split(",") if alias.strip()}
    if path.endswith("/mlflow/registered-models/alias") and request.method in ("POST", "DELETE"):
        if str(params.get("alias", "")) not in reviewed:
            return None
        if not _is_reviewer(username):
            return _refuse(f"only members of the reviewers role may move '{params.get('alias')}' "
                           f"('{username}' is not); use kdsec review approve as a reviewer")
        if request.method == "POST" and _setting("KDSEC_FOUR_EYES", "1") not in ("0", "false", "off"):
            launcher = _version_launcher(str(params.get("name", "")), str(params.get("version", "")))
            if launcher is None:
                return _refuse("four-eyes: this version has no kdsec.launched_by tag, so its author is unknown")
            if launcher == username:
                return _refuse(f"four-eyes: '{username}' launched the run behind this version and cannot approve it")
        return None
    if path.endswith("/mlflow/model-versions/set-tag") and request.method == "POST":
        key, value = str(params.get("key", "")), str(params.get("value", ""))
        if key == LAUNCHED_BY and value != username:
            return _refuse(f"{LAUNCHED_BY} may only name the caller ('{username}')")
        if key.startswith(REVIEW_PREFIX) and (key, value) != PENDING and not _is_reviewer(username):
            return _refuse(f"only members of the reviewers role may set {key}")
        return None
    if path.endswith("/mlflow/model-versions/delete-tag") and request.method == "DELETE":
        key = str(params.get("key", ""))
        if key == LAUNCHED_BY or (key.startswith(REVIEW_PREFIX) and not _is_reviewer(username)):
            return _refuse(f"'{username}' may not delete {key}")
        return None
    if path.endswith("/mlflow/model-versions/create") and request.method == "POST":
        for tag in params.get("tags") or []:
            if isinstance(tag, dict) and tag.get("key") == LAUNCHED_BY and tag.get("value") != username:
                return _refuse(f"{LAUNCHED_BY} may only name the caller ('{username}')")
            if (isinstance(tag, dict) and str(tag.get("key", "")).startswith(REVIEW_PREFIX)
                    and (tag.get("key"), tag.get("value")) != PENDING):
                return _refuse("a new version cannot carry review decisions")
    return None


def authenticate() -> Authorization | Response:
    """MLflow's basic-auth check, then kdsec's review rules (admins are exempt: break-glass)."""
    authorization = authenticate_request_basic_auth()
    if isinstance(authorization, Response):
        return authorization
    if store.get_user(authorization.username).is_admin:
        return authorization
    return _review_rules(authorization.username) or authorization
