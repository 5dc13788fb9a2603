"""MLflow: tracking location, stage runs, model logging, registration and alias promotion."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import kdsec
from kdsec.crypto import attestation
from kdsec.crypto.attestation import CLAIMED_BY, REQUEST_CONFIG, REQUEST_DEPLOYMENT, REQUEST_OVERRIDES, TRIGGERED_BY
from kdsec.errors import IntegrityError, KdsecError
from kdsec.fileio import strict_json, write_atomic
from kdsec.gates import GateVerdict, all_passed

PACKAGE_DIR = Path(kdsec.__file__).resolve().parent
RUN_STARTED = "kdsec.run_started"  # version tag: when its pipeline run started (ms), to order concurrent runs


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect() -> None:
    """Point MLflow at the tracking store (``tracking_uri``)."""
    mlflow.set_tracking_uri(tracking_uri())


EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow UI opens a model-training experiment in its runs view


def configure(experiment: str) -> str:
    """Point MLflow at the tracking store and experiment (tagged as model training, not GenAI);
    return the experiment id."""
    connect()
    found = mlflow.set_experiment(experiment)
    if EXPERIMENT_KIND not in (found.tags or {}):
        MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    return found.experiment_id


UI_URL_ENV = "KDSEC_MLFLOW_UI_URL"  # where reviewers open the MLflow UI, when it is not the tracking URI
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` on a local store
ML_VIEW = "workflowType=machine_learning"  # the MLflow UI's model-training view, not its GenAI one


def redact(uri: str) -> str:
    """A URI without its user name and password (for links and anything printed)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))


def ui_base() -> tuple[str, str]:
    """The MLflow UI's address for links in reports, and a note on how to reach it: ``$KDSEC_MLFLOW_UI_URL``
    (http or https only); else the tracking server (an http(s) URI); else, for a local store,
    ``make mlflow-ui``'s. Credentials are never part of it."""
    configured = os.environ.get(UI_URL_ENV, "")
    if configured:
        if not configured.startswith(("http://", "https://")):
            raise KdsecError(f"{UI_URL_ENV} must be an http(s) address, not '{redact(configured)}'")
        return redact(configured).rstrip("/"), ""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return redact(uri).split("?", 1)[0].split("#", 1)[0].rstrip("/"), ""
    if uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri:
        return LOCAL_UI, "local store: open it with make mlflow-ui"
    return LOCAL_UI, f"set {UI_URL_ENV} to where your team's MLflow UI is served"


def ui_links(run_id: str, model_name: str | None = None, version: str | None = None) -> dict[str, str]:
    """``run_url`` (the run's page), ``version_url`` (the registered version's page) and ``ui_note``."""
    base, note = ui_base()
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    # The UI's GenAI / model-training switch is a per-browser setting; the link picks model training.
    links = {"run_url": f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}", "ui_note": note}
    if model_name and version:
        from urllib.parse import quote

        links["version_url"] = (f"{base}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"
                                f"?{ML_VIEW}")
    return links


# The columns where MLflow records an artifact location (absolute for a local store); nothing
# else (params, tags, descriptions: the run's history) is rewritten.
LOCATION_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                    "model_versions": ("source", "storage_location"), "logged_models": ("artifact_location",)}


def relocate_store(database: Path, old_root: Path, new_root: Path | None = None) -> int:
    """Rewrite a local SQLite store after its project folder moved from ``old_root`` to
    ``new_root`` (default: the folder that holds the store): MLflow records absolute artifact
    locations, so each one under ``old_root`` (plain or ``file://``) is moved under ``new_root``,
    in one transaction. Returns how many values changed."""
    import sqlite3

    old = os.path.normpath(str(old_root))
    new = os.path.normpath(str(new_root if new_root is not None else database.resolve().parent))
    if not os.path.isabs(old) or old == "/" or old == new:
        raise KdsecError(f"--from must be the folder's previous absolute path (not '/', not the current one), "
                         f"not '{old_root}'")
    if new.startswith(old + "/"):
        raise KdsecError(f"the new place {new} is inside the old one {old}: a folder cannot have moved there")
    if not database.is_file() or database.is_symlink():
        raise KdsecError(f"no SQLite tracking store at '{database}' (a regular file)")
    changed = 0
    try:
        with sqlite3.connect(database) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, columns in LOCATION_COLUMNS.items():
                if table not in tables:
                    continue
                present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
                for column in (c for c in columns if c in present):
                    for prefix, replacement in ((old, new), (f"file://{old}", f"file://{new}")):
                        cursor = connection.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                            (replacement, len(prefix) + 1, prefix, len(prefix) + 1, prefix + "/"))
                        changed += cursor.rowcount
    except sqlite3.Error as exc:
        raise KdsecError(f"'{database}' could not be rewritten: {exc}") from None
    return changed


# --- who is acting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool  # true when the tracking server vouched for it (MLflow basic-auth)


def identity() -> Identity:
    """Who the tracking server says we are (``GET /api/2.0/mlflow/users/current`` with the
    credentials in ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), or, against a store that
    authenticates nobody, ``local:<login>`` marked unauthenticated."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")) and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/users/current", "GET",
                                    max_retries=2, timeout=30, raise_on_status=False)
        except MlflowException as exc:
            raise KdsecError(f"the tracking server at {uri} did not answer ({first_line(exc)})") from None
        if response.status_code == 401:
            raise KdsecError(f"the tracking server at {uri} refused the credentials in MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD")
        if response.status_code == 200:
            return Identity(str(response.json()["user"]["username"]), True)
    return Identity(f"local:{getpass.getuser()}", False)


# --- who asked for a run ------------------------------------------------------------------------
#
# Prefect's API authenticates nobody, so a flow parameter cannot say who asked for a run. A request
# is a run in the experiment that the asker creates through the tracking server, tagged with their
# name (the team server's plugin refuses a ``kdsec.triggered_by`` that is not the caller's own
# name, and any later change to a request's tags), with the config it asks for. The deployed run
# claims it once (the plugin lets only the pipeline identity claim, and only an unclaimed request)
# and runs that config: replaying someone's request, or handing their request id to another run,
# can only run what they asked for, once.


def requester() -> Identity:
    """Who asks for a run: an identity the tracking server authenticated, or a one-line error."""
    asker = identity()
    if not asker.authenticated:
        raise KdsecError("a run request must name who asks: point MLFLOW_TRACKING_URI at the team's tracking "
                         "server and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    return asker


def create_run_request(experiment: str, deployment: str, config_path: str, overrides: list[str]) -> tuple[str, str]:
    """Record, as the authenticated caller, a request to run ``deployment`` with ``config_path`` and
    ``overrides``; return (request run id, who asked)."""
    from datetime import datetime, timezone

    asker = requester()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        experiment_id = configure(experiment)
        client = MlflowClient()  # after configure: a client binds the tracking URI it is made with
        run = client.create_run(experiment_id, run_name=f"request-{stamp}-{asker.name}", tags={
            TRIGGERED_BY: asker.name, REQUEST_CONFIG: config_path, REQUEST_OVERRIDES: json.dumps(list(overrides)),
            REQUEST_DEPLOYMENT: deployment})
        client.set_terminated(run.info.run_id, "FINISHED")
    except MlflowException as exc:
        raise KdsecError(f"the tracking server refused the run request of '{asker.name}': {first_line(exc)}") from None
    return run.info.run_id, asker.name


def claim_run_request(request_run_id: str, flow_run_id: str, config_path: str | None = None,
                      overrides: list[str] | None = None) -> dict:
    """Claim request ``request_run_id`` for flow run ``flow_run_id`` (a request starts one run); return
    the trigger (``kind``, ``by``) and the ``config_path`` and ``overrides`` it asks for. A flow run
    that names its own ``config_path`` (and ``overrides``) must name the request's: it is checked
    before the claim, so a mismatched run cannot use up someone else's request."""
    client = MlflowClient()
    try:
        run = client.get_run(request_run_id)
    except MlflowException as exc:
        raise KdsecError(f"run request {request_run_id} could not be read from {redact(tracking_uri())} "
                         f"({first_line(exc)})") from None
    tags = run.data.tags
    asker = tags.get(TRIGGERED_BY)
    if not asker or REQUEST_CONFIG not in tags:
        raise KdsecError(f"run {request_run_id} is not a run request (no {TRIGGERED_BY} and config tags); "
                         "create one with kdsec trigger")
    try:
        asked = json.loads(tags.get(REQUEST_OVERRIDES, "[]"))
    except ValueError:
        asked = None
    if not isinstance(asked, list) or not all(isinstance(item, str) for item in asked):
        raise KdsecError(f"run request {request_run_id}: its {REQUEST_OVERRIDES} tag is not a list of strings")
    if config_path is not None and (config_path, list(overrides or [])) != (tags[REQUEST_CONFIG], asked):
        raise KdsecError(f"the flow run's config ({config_path}, {overrides}) is not what run request "
                         f"{request_run_id} asks for ({tags[REQUEST_CONFIG]}, {asked})")
    if run.info.status == "FAILED":
        raise KdsecError(f"run request {request_run_id} was withdrawn (its deployment never started); make a new one "
                         "with kdsec trigger")
    claimed = tags.get(CLAIMED_BY)
    if claimed and claimed != flow_run_id:
        raise KdsecError(f"run request {request_run_id} already started flow run {claimed}; a request starts one "
                         "run: make a new one with kdsec trigger")
    if not claimed:
        try:
            client.set_tag(request_run_id, CLAIMED_BY, flow_run_id)
        except MlflowException as exc:  # the team server's plugin refuses a second claim, atomically
            raise KdsecError(f"run request {request_run_id} could not be claimed: {first_line(exc)}") from None
    return {"kind": f"request:{request_run_id}", "by": asker, "config_path": tags[REQUEST_CONFIG],
            "overrides": asked}


def withdraw_run_request(request_run_id: str) -> None:
    """Mark a request whose deployment never started FAILED: nothing may claim it later."""
    MlflowClient().set_terminated(request_run_id, "FAILED")


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when it has none (for one-line errors)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


# --- runs --------------------------------------------------------------------------------------


def start_parent_run(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's parent run, tagged with where it runs (host, pid) so a run that was
    killed can be recognized and closed later. It is not made the thread's active run, so
    stage runs can nest under it from any worker thread."""
    tags = {**tags, "kdsec.host": socket.gethostname(), "kdsec.pid": str(os.getpid())}
    return MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id


def running_parent_runs(experiment_id: str) -> list:
    """The experiment's kd-pipeline parent runs still marked RUNNING."""
    return MlflowClient().search_runs([experiment_id], "attributes.status = 'RUNNING' and tags.`kdsec.pid` != ''",
                                      max_results=200)


def close_abandoned_runs(experiment_id: str, ended: Callable[[dict[str, str]], str | None]) -> list[str]:
    """Mark FAILED every RUNNING parent run whose process is gone: on this host, a pid that no
    longer exists; elsewhere, whatever ``ended(tags)`` says (e.g. its Prefect flow run crashed).
    Returns the ids closed. A killed run would otherwise stay RUNNING forever."""
    closed = []
    for run in running_parent_runs(experiment_id):
        tags = run.data.tags
        reason = ended(tags)
        if reason is None and tags.get("kdsec.host") == socket.gethostname() and not process_alive(tags.get("kdsec.pid", "")):
            reason = f"process {tags['kdsec.pid']} on {tags['kdsec.host']} is gone"
        if reason:
            client = MlflowClient()
            client.set_tag(run.info.run_id, "kdsec.closed", f"abandoned: {reason}")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


def process_alive(pid: str) -> bool:
    """Whether process ``pid`` (of this host) still runs; a zombie has exited."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a zombie has exited: its run is over
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def finish_run(run_id: str, succeeded: bool) -> None:
    MlflowClient().set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


def log_dataset(run_id: str, dataset, context: str) -> None:
    from mlflow.entities import DatasetInput, InputTag

    tag = InputTag(key="mlflow.data.context", value=context)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])


Span = tuple[float, float]  # a stage's (start, end) wall-clock time, seconds since the epoch


@contextmanager
def stage_run(parent_run_id: str, stage: str, span: Span | None = None) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one pipeline stage, under the pipeline's parent run (any thread). Stages
    are recorded after they ran: with ``span`` the run carries the stage's real start and end
    times, not the milliseconds its recording took."""
    if span is None:
        with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id) as run:
            yield run
        return
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    from mlflow.tracking.context.registry import resolve_tags

    created = client.create_run(parent.info.experiment_id, start_time=int(span[0] * 1000), run_name=stage,
                                tags=resolve_tags({MLFLOW_PARENT_RUN_ID: parent_run_id}))
    with mlflow.start_run(run_id=created.info.run_id, nested=True) as run:
        yield run
    client.set_terminated(created.info.run_id, "FINISHED", end_time=int(span[1] * 1000))


def log_dict_artifact(payload: dict, name: str, run_id: str) -> None:
    MlflowClient().log_text(run_id, strict_json(payload), name)


def log_student_model(checkpoint: Path, checkpoint_format: str, input_scale: float, class_names: list[str],
                      normalization=None, example=None) -> str:
    """Log the candidate, in the active run, as a pyfunc model that predicts labels from raw
    pixels, with its output signature and ``example`` (a few rows of raw pixels) as the input
    example; return its URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # The output only: an input schema would make MLflow refuse any dtype but the declared one
    # (float32, uint8 and int64 arrays for a float64 schema); the model checks its input itself.
    signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    with tempfile.TemporaryDirectory() as scratch:
        serving = Path(scratch) / "serving.json"
        write_atomic(serving, json.dumps({"format": checkpoint_format, "input_scale": input_scale,
                                          "normalization": normalization, "class_names": class_names}))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "pyfunc_entry.py"),
            artifacts={"checkpoint": str(checkpoint), "serving": str(serving)},
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=_pip_requirements(),
            signature=signature,
            input_example=None if example is None else np.asarray(example, dtype=np.float64),
        )
    return info.model_uri


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "numpy", "pandas", "safetensors", "pydantic", "pyyaml", "scikit-learn", "scipy", "rich",
             "mlflow")]


def champion_version(model_name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def version_description(verdicts: list[GateVerdict], parent_run_id: str) -> str:
    """What a reviewer reads first on a version's page: PASSED or FAILED, the failing and
    warning checks with their values, every gate's figures, and where the run and report are."""
    failed = [check for verdict in verdicts for check in verdict.checks if check.level == "fail"]
    warned = [check for verdict in verdicts for check in verdict.checks if check.level == "warn"]

    def figure(check) -> str:
        value = "missing" if check.value is None else f"{check.value:.4f}"
        return f"{check.metric} {value} (needs {check.direction} {check.threshold:g})"

    lines = ["FAILED: " + "; ".join(figure(check) for check in failed) if failed else "PASSED: every gate"]
    if warned:
        lines.append("Warnings: " + "; ".join(f"{check.metric} {check.value:.4f} (warn past {check.warn_threshold:g})"
                                              for check in warned))
    lines.append("Gates: " + ", ".join(f"{verdict.name} {verdict.level}" for verdict in verdicts))
    lines.append(f"Pipeline run: {parent_run_id} (report: runs:/{parent_run_id}/report/report.html)")
    links = ui_links(parent_run_id)
    lines.append(f"Open the run and its report in the MLflow UI: {links['run_url']}"
                 + (f" ({links['ui_note']})" if links["ui_note"] else ""))
    return "\n".join(lines)


def register_candidate(model_uri: str, model_name: str, verdicts: list[GateVerdict], run_id: str,
                       extra_tags: dict[str, str]) -> str:
    """Register a new version carrying every gate's verdict and who launched it as tags (set at
    creation, in one call: there is no half-tagged version), described for a reviewer; the
    pipeline's parent run is tagged with it; return the version."""
    client = MlflowClient()
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    passed = all_passed(verdicts)
    # The verdict first: the registry lists a version's tags in the order they were set.
    tags = {"verdict": "PASSED" if passed else "FAILED", "gates": "pass" if passed else "fail"}
    tags.update({f"gate.{verdict.name}": verdict.verdict for verdict in verdicts})
    tags.update({f"gate.{verdict.name}.warn": ",".join(verdict.warnings) for verdict in verdicts if verdict.warnings})
    tags["kdsec.launched_by"] = identity().name
    parent = _pipeline_run(run_id)
    tags[RUN_STARTED] = str(client.get_run(parent).info.start_time)
    tags.update(extra_tags)
    # A tracking server accepts a ``models:/<id>`` source only together with that logged model's id.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    version = client.create_model_version(model_name, model_uri, run_id=run_id, tags=tags, model_id=model_id,
                                          description=version_description(verdicts, parent))
    # The pipeline's parent run records the version it registered (its source run is the nested
    # `register` run that logged the model, under that parent).
    client.set_tag(parent, "kdsec.registered_version", f"{model_name}/{version.version}")
    return version.version


def _set_alias(model_name: str, alias: str, version: str) -> None:
    try:
        MlflowClient().set_registered_model_alias(model_name, alias, str(version))
    except MlflowException as exc:
        if exc.get_http_status_code() == 403:
            raise KdsecError(f"the tracking server refused to move '{alias}' to version {version}: "
                             f"{first_line(exc)}") from None
        raise


# --- verdict attestations ----------------------------------------------------------------------


def attested_verdict(version, trusted) -> attestation.Verdict:
    """The pipeline's signed verdict on a registry version object (``MlflowClient`` model version),
    checked against ``trusted``; an IntegrityError names the version and what failed."""
    return attestation.verify(version.tags.get(attestation.TAG), trusted, model=version.name,
                              version=str(version.version), source=version.source, run_id=version.run_id or "")


def attested_pass(trusted) -> Callable[[Any], bool]:
    """An eligibility rule for ``settle_alias``: the version carries a valid attestation that says pass."""

    def eligible(version) -> bool:
        try:
            return attested_verdict(version, trusted).passed
        except IntegrityError:
            return False

    return eligible


def attest_version(registered: dict, verdicts: list[GateVerdict], signer, trigger: dict, audit_sha256: str) -> str:
    """Sign the pipeline's verdict on the version it just registered (see ``kdsec.crypto.attestation``)
    and record it on the version; return the tag value."""
    details = _version(registered["model"], registered["version"])
    verdict = attestation.Verdict(model=details.name, version=str(details.version), source=details.source,
                      run_id=details.run_id or "", pipeline_run=_pipeline_run(details.run_id),
                      audit_sha256=audit_sha256, model_sha256=model_sha256(details.name, str(details.version)),
                      gates={v.name: v.verdict for v in verdicts},
                      verdict="pass" if all_passed(verdicts) else "fail",
                      launched_by=details.tags.get("kdsec.launched_by", ""),
                      triggered_by=trigger.get("by"), trigger=trigger["kind"])
    value = attestation.sign(verdict, signer)
    MlflowClient().set_model_version_tag(details.name, str(details.version), attestation.TAG, value)
    return value


def settle_alias(model_name: str, alias: str, eligible: Callable[[Any], bool]) -> str | None:
    """Point ``alias`` at the eligible version whose pipeline run started last, and return it.
    Every run calls this after registering its own version, so with runs at once the later-started
    passing run wins whatever order they finish in, and no check-then-set race can leave the
    alias on an earlier run: the last call sees every registered version."""
    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"name='{model_name}'") if eligible(v)]
    if not versions:
        return None
    best = max(versions, key=lambda v: (int(v.tags.get(RUN_STARTED, "0") or 0), int(v.version)))
    if champion_version(model_name, alias) != str(best.version):
        _set_alias(model_name, alias, best.version)
    return str(best.version)


def note_superseded(model_name: str, version: str, holder: str) -> None:
    MlflowClient().set_model_version_tag(model_name, str(version), "promotion",
                                         f"passed, not promoted: version {holder} comes from a run that started later")


def mark_candidate(model_name: str, version: str, candidate_alias: str, eligible: Callable[[Any], bool]) -> str | None:
    """Gates passed but promotion waits for a reviewer: review pending, and ``candidate_alias``
    on the latest-started pending version that is ``eligible`` (see ``settle_alias``), which is returned."""
    MlflowClient().set_model_version_tag(model_name, version, "review.status", "pending")
    return settle_alias(model_name, candidate_alias,
                        lambda v: v.tags.get("review.status") == "pending" and eligible(v))


def register_version(settings, parent_run_id: str, checkpoint: Path, checkpoint_format: str, serving: dict,
                     verdicts: list[GateVerdict], extra_tags: dict[str, str]) -> dict:
    """Log the candidate as a pyfunc model and register a version with its gate tags (no alias
    moves yet: that waits for the attestation, see ``promote``). ``settings``: the ``tracking``
    config section; ``serving``: the ``input_scale``, ``class_names`` and ``normalization`` a served
    model needs. Returns the registry record of a version not (yet) promoted."""
    previous = champion_version(settings.registered_model, settings.alias)
    with stage_run(parent_run_id, "register") as run:
        model_uri = log_student_model(checkpoint, checkpoint_format, serving["input_scale"],
                                      serving["class_names"], serving.get("normalization"), serving.get("example"))
        version = register_candidate(model_uri, settings.registered_model, verdicts, run.info.run_id, extra_tags)
    return {"model": settings.registered_model, "version": str(version), "model_uri": model_uri,
            "alias": settings.alias, "promoted": False, "awaiting_review": False, "candidate_alias": None,
            "superseded_by": None, "previous_champion": previous, "champion": previous}


def promote(settings, registered: dict, verdicts: list[GateVerdict], signer, trigger: dict, audit_sha256: str,
            trusted) -> dict:
    """Attest the registered version's verdict (signed with ``signer``), then move the alias only if
    every gate passed — or, with ``require_approval``, mark it for review. Only versions whose
    attestation verifies against ``trusted`` and says pass are eligible, so a hand-registered or
    re-tagged version never takes the alias. Returns the registry record."""
    if attestation.public_key_id(trusted) != signer.key_id:  # else its own verdict could never promote it
        raise KdsecError(f"version {registered['version']} would be signed with key {signer.key_id}, but verdicts "
                         f"are checked against key {attestation.public_key_id(trusted)} ({attestation.PUBLIC_KEY_ENV} "
                         "or the signing key's .pub): give the pipeline the matching key")
    attest_version(registered, verdicts, signer, trigger, audit_sha256)
    passed = all_passed(verdicts)
    eligible = attested_pass(trusted)
    model, version = settings.registered_model, registered["version"]
    holder = None
    if passed and settings.require_approval:
        holder = mark_candidate(model, version, settings.candidate_alias, eligible)
    elif passed:
        holder = settle_alias(model, settings.alias, eligible)
    superseded_by = holder if holder not in (None, str(version)) else None
    if superseded_by:
        note_superseded(model, version, superseded_by)
    awaiting_review = passed and settings.require_approval and holder == str(version)
    promoted = passed and not settings.require_approval and holder == str(version)
    return {**registered, "promoted": promoted, "awaiting_review": awaiting_review,
            "candidate_alias": settings.candidate_alias if awaiting_review else None,
            "superseded_by": superseded_by, "champion": str(version) if promoted else registered["previous_champion"]}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: a nested config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_run_config(run_id: str, config_file: Path, config_tree: dict) -> None:
    """The resolved config: as an artifact, and every leaf as a param (MLflow caps values at 500)."""
    from mlflow.entities import Param

    client = MlflowClient()
    client.log_artifact(run_id, str(config_file))
    client.log_batch(run_id, params=[Param(key, str(value)[:500]) for key, value in flatten(config_tree).items()])


def log_gates(run_id: str, metrics: dict[str, float], verdicts: list[GateVerdict]) -> None:
    """The gate metrics on the parent run, and ``gate.<name>`` (+ ``.warn``) tags with the verdicts."""
    client = MlflowClient()
    for name, value in metrics.items():
        client.log_metric(run_id, str(name), float(value))
    for verdict in verdicts:
        client.set_tag(run_id, f"gate.{verdict.name}", verdict.verdict)
        if verdict.warnings:
            client.set_tag(run_id, f"gate.{verdict.name}.warn", ",".join(verdict.warnings))


def _pipeline_run(run_id: str) -> str:
    return MlflowClient().get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)


def version_tags_and_aliases(model_name: str, version: str) -> tuple[dict[str, str], list[str]]:
    """A version's tags and aliases, from one read of the registry."""
    found = _version(model_name, version)
    return dict(found.tags), sorted(found.aliases or [])


def tag_version(model_name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)


def _version(model_name: str, version: str):
    try:
        return MlflowClient().get_model_version(model_name, str(version))
    except MlflowException:
        raise KdsecError(f"model '{model_name}' has no version {version} in {tracking_uri()}") from None


def audit_digest(model_name: str, version: str) -> str:
    """SHA-256 of the ``audit.json`` the version's pipeline run published: what a reviewer read."""
    return audit_sha256(version_pipeline_run(model_name, version))


def model_sha256(model_name: str, version: str) -> str:
    """``attestation.tree_sha256`` of a registered version's model files, as the registry serves them."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as scratch:
        try:
            root = download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=scratch)
        except (MlflowException, OSError) as exc:
            raise KdsecError(f"version {version} of '{model_name}': its model files could not be read "
                             f"({first_line(exc)})") from None
        return attestation.tree_sha256(Path(root))


def audit_sha256(pipeline_run: str) -> str:
    """SHA-256 of the ``audit.json`` that pipeline run ``pipeline_run`` published."""
    with tempfile.TemporaryDirectory() as scratch:
        return hashlib.sha256(download_run_artifact(pipeline_run, "report/audit.json", Path(scratch)).read_bytes()
                              ).hexdigest()


def check_approvable(details, reviewer: Identity, trusted, four_eyes: bool = True) -> attestation.Verdict:
    """The attested verdict of registry version ``details`` if ``reviewer`` may move champion to it;
    else a one-line KdsecError naming the version, the failed check and what would pass it. The
    ``audit.json`` checked is the one the signed verdict names (its pipeline run), not a run tag."""
    version = details.version
    if trusted is None:
        raise KdsecError(f"version {version}: no trusted key to check its verdict attestation; set "
                         f"{attestation.PUBLIC_KEY_ENV} to the pipeline's public key")
    try:
        verdict = attested_verdict(details, trusted)
    except IntegrityError as exc:
        raise KdsecError(f"{exc}; it cannot be approved into champion") from None
    if reason := attestation.refusal(verdict, reviewer.name, four_eyes and reviewer.authenticated,
                                     details.tags.get("kdsec.launched_by")):
        raise KdsecError(reason)
    digest = audit_sha256(verdict.pipeline_run)
    if digest != verdict.audit_sha256:
        raise KdsecError(f"version {version}: the audit.json published with its run (sha256 {digest[:16]}…) is "
                         f"not the one the pipeline attested ({verdict.audit_sha256[:16]}…): the report was altered; "
                         "re-run the pipeline")
    if model_sha256(details.name, str(version)) != verdict.model_sha256:
        raise KdsecError(f"version {version}: its model files (weights, serving settings or code) are not the ones "
                         "the pipeline attested: they were replaced after the run; re-run the pipeline")
    return verdict


def review(model_name: str, version: str, decision: str, comment: str, champion_alias: str,
           candidate_alias: str, four_eyes: bool = True, trusted=None) -> dict:
    """Record a reviewer's decision on the version (who — the identity the tracking server
    authenticated —, when, comment, and the digest of the ``audit.json`` reviewed); approval moves
    ``champion_alias`` to it, and only when the pipeline's attestation (checked against ``trusted``)
    says every gate passed and the ``audit.json`` it names is the one published. With ``four_eyes``,
    an authenticated reviewer may not approve a version whose run they launched or triggered. A
    decided version loses ``candidate_alias``. Every check runs before anything is written."""
    from datetime import datetime, timezone

    if decision not in ("approve", "reject"):
        raise KdsecError(f"decision must be 'approve' or 'reject', not '{decision}'")
    details = _version(model_name, version)
    reviewer = identity()
    if decision == "approve":
        digest = check_approvable(details, reviewer, trusted, four_eyes).audit_sha256
    else:
        digest = audit_digest(model_name, version)
    client = MlflowClient()
    status = "approved" if decision == "approve" else "rejected"
    record = {"status": status, "reviewer": reviewer.name, "authenticated": str(reviewer.authenticated).lower(),
              "comment": comment, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "audit_sha256": digest}
    # The alias first: a server that refuses it (its plugin checks the attestation and four-eyes
    # again) leaves no review record behind.
    previous = champion_version(model_name, champion_alias)
    if decision == "approve":
        _set_alias(model_name, champion_alias, version)
    # The last ten decisions, comments cut short (a tag holds at most 5000 characters).
    try:
        earlier = json.loads(details.tags.get("review.history", "[]"))
    except ValueError:
        earlier = []
    history = (earlier if isinstance(earlier, list) else [])[-9:] + [{**record, "comment": comment[:150]}]
    try:
        for key, value in {**{f"review.{k}": v for k, v in record.items()},
                           "review.history": json.dumps(history)}.items():
            client.set_model_version_tag(model_name, str(version), key, value)
    except MlflowException as exc:  # no promotion without its record: put champion back
        if decision == "approve" and previous != str(version):
            if previous is None:
                client.delete_registered_model_alias(model_name, champion_alias)
            else:
                _set_alias(model_name, champion_alias, previous)
        raise KdsecError(f"version {version}: the review record could not be written ({first_line(exc)}); "
                         f"'{champion_alias}' is back on {previous or 'no version'}") from None
    try:
        if str(client.get_model_version_by_alias(model_name, candidate_alias).version) == str(version):
            client.delete_registered_model_alias(model_name, candidate_alias)
    except MlflowException:
        pass
    return {"version": str(version), "status": status, "reviewer": reviewer.name,
            "authenticated": reviewer.authenticated, "audit_sha256": record["audit_sha256"],
            "champion": champion_version(model_name, champion_alias)}


def package_versions(package_version: str) -> list[tuple[str, str, list[str]]]:
    """The registered versions whose encrypted package is ``package_version`` (the pipeline run id
    a package records): (model, version, aliases)."""
    client = MlflowClient()
    safe = package_version.replace("'", "")
    found = client.search_model_versions(f"tags.`package.version` = '{safe}'")
    return [(v.name, str(v.version), version_tags_and_aliases(v.name, str(v.version))[1]) for v in found]


def resolve_version(model_uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` → (name, version)."""
    if not model_uri.startswith("models:/"):
        raise KdsecError(f"'{model_uri}' is not a registry URI (expected models:/NAME/VERSION or models:/NAME@ALIAS)")
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        try:
            return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException:
            raise KdsecError(f"model '{name}' has no alias '{alias}'") from None
    name, _, version = rest.partition("/")
    if not version:
        raise KdsecError(f"'{model_uri}' names no version (expected models:/NAME/VERSION)")
    return name, str(_version(name, version).version)


def version_pipeline_run(model_name: str, version: str) -> str:
    """The kd-pipeline parent run that produced a version (its summary, report and config)."""
    return _pipeline_run(_version(model_name, version).run_id)


def download_run_artifact(run_id: str, path: str, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, path, str(destination)))
    except (MlflowException, OSError) as exc:
        raise KdsecError(f"run {run_id} has no artifact '{path}' ({first_line(exc)})") from None


def download_version_checkpoint(name: str, version: str, destination: Path) -> Path:
    """A registered version's weights file, and nothing that runs: its ``MLmodel`` (read with
    ``yaml.safe_load``) names the checkpoint artifact, which is downloaded alone. Loading the
    version with ``mlflow.pyfunc.load_model`` would execute the model code stored beside it."""
    from pathlib import PurePosixPath

    import yaml
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    from kdsec.fileio import read_bounded

    destination.mkdir(parents=True, exist_ok=True)
    try:
        repository = ModelsArtifactRepository(f"models:/{name}/{version}")
        mlmodel = Path(repository.download_artifacts("MLmodel", str(destination)))
        document = yaml.safe_load(read_bounded(mlmodel, 1 << 20, "MLmodel"))
        relative = document["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise KdsecError(f"version {version} of '{name}' has no kdsec checkpoint artifact "
                         f"({first_line(exc)})") from None
    path = PurePosixPath(str(relative))
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != ("artifacts",) or path.suffix != ".safetensors":
        raise KdsecError(f"version {version} of '{name}' names an unexpected checkpoint path {str(relative)[:80]!r}")
    try:
        return Path(repository.download_artifacts(str(path), str(destination)))
    except (MlflowException, OSError) as exc:
        raise KdsecError(f"version {version} of '{name}': checkpoint download failed ({first_line(exc)})") from None
