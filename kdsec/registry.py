"""MLflow: tracking location, stage runs, model logging, registration and alias promotion."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import kdsec
from kdsec.errors import KdsecError
from kdsec.gates import GateVerdict, all_passed

PACKAGE_DIR = Path(kdsec.__file__).resolve().parent


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(experiment: str) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.set_experiment(experiment).experiment_id


def start_parent_run(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's parent run. It is not made the thread's active run, so stage runs
    can nest under it from any worker thread."""
    return MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id


def finish_run(run_id: str, succeeded: bool) -> None:
    MlflowClient().set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


def log_dataset(run_id: str, dataset, context: str) -> None:
    from mlflow.entities import DatasetInput, InputTag

    tag = InputTag(key="mlflow.data.context", value=context)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])


@contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one pipeline stage, under the pipeline's parent run (any thread)."""
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id) as run:
        yield run


def log_dict_artifact(payload: dict, name: str, run_id: str) -> None:
    MlflowClient().log_text(run_id, json.dumps(payload, indent=2, default=str), name)


def log_student_model(checkpoint: Path, checkpoint_format: str, input_scale: float, class_names: list[str],
                      normalization=None) -> str:
    """Log the candidate, in the active run, as a pyfunc model that predicts labels from raw
    pixels; return its URI."""
    with tempfile.TemporaryDirectory() as scratch:
        serving = Path(scratch) / "serving.json"
        serving.write_text(json.dumps({"format": checkpoint_format, "input_scale": input_scale,
                                       "normalization": normalization,
                                       "class_names": class_names}))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "serving_model.py"),
            artifacts={"checkpoint": str(checkpoint), "serving": str(serving)},
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=_pip_requirements(),
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


def register_candidate(model_uri: str, model_name: str, verdicts: list[GateVerdict], run_id: str,
                       extra_tags: dict[str, str]) -> str:
    """Register a new version carrying every gate's verdict as tags; return the version."""
    client = MlflowClient()
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = {f"gate.{verdict.name}": verdict.verdict for verdict in verdicts}
    tags.update({f"gate.{verdict.name}.warn": ",".join(verdict.warnings) for verdict in verdicts if verdict.warnings})
    tags["gates"] = "pass" if all_passed(verdicts) else "fail"
    tags.update(extra_tags)
    version = client.create_model_version(model_name, model_uri, run_id=run_id, tags=tags)
    return version.version


def promote(model_name: str, version: str, alias: str, verdicts: list[GateVerdict]) -> bool:
    """Move ``alias`` to ``version`` only when every gate passed; otherwise leave it where it is."""
    if not all_passed(verdicts):
        return False
    MlflowClient().set_registered_model_alias(model_name, alias, version)
    return True


def mark_candidate(model_name: str, version: str, candidate_alias: str) -> None:
    """Gates passed but promotion waits for a reviewer: alias ``candidate_alias``, review pending."""
    client = MlflowClient()
    client.set_registered_model_alias(model_name, candidate_alias, version)
    client.set_model_version_tag(model_name, version, "review.status", "pending")


def _version(model_name: str, version: str):
    try:
        return MlflowClient().get_model_version(model_name, str(version))
    except MlflowException:
        raise KdsecError(f"model '{model_name}' has no version {version} in {tracking_uri()}") from None


def review(model_name: str, version: str, decision: str, reviewer: str, comment: str, champion_alias: str,
           candidate_alias: str) -> dict:
    """Record a reviewer's decision as version tags; approval of a version that passed every gate
    moves ``champion_alias`` to it. A rejected or approved version loses ``candidate_alias``."""
    from datetime import datetime, timezone

    if decision not in ("approve", "reject"):
        raise KdsecError(f"decision must be 'approve' or 'reject', not '{decision}'")
    if not reviewer.strip():
        raise KdsecError("--reviewer must name who decided")
    details = _version(model_name, version)
    if decision == "approve" and details.tags.get("gates") != "pass":
        raise KdsecError(f"version {version} did not pass its gates (gates={details.tags.get('gates')}); "
                         "it cannot be approved into champion")
    client = MlflowClient()
    status = "approved" if decision == "approve" else "rejected"
    for key, value in {"review.status": status, "review.reviewer": reviewer, "review.comment": comment,
                       "review.time": datetime.now(timezone.utc).isoformat(timespec="seconds")}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    if decision == "approve":
        client.set_registered_model_alias(model_name, champion_alias, str(version))
    try:
        if str(client.get_model_version_by_alias(model_name, candidate_alias).version) == str(version):
            client.delete_registered_model_alias(model_name, candidate_alias)
    except MlflowException:
        pass
    return {"version": str(version), "status": status, "champion": champion_version(model_name, champion_alias)}


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
    run = MlflowClient().get_run(_version(model_name, version).run_id)
    return run.data.tags.get("mlflow.parentRunId", run.info.run_id)


def download_run_artifact(run_id: str, path: str, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, path, str(destination)))
    except (MlflowException, OSError) as exc:
        raise KdsecError(f"run {run_id} has no artifact '{path}' ({str(exc).splitlines()[0]})") from None


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
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    path = PurePosixPath(str(relative))
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != ("artifacts",) or path.suffix != ".safetensors":
        raise KdsecError(f"version {version} of '{name}' names an unexpected checkpoint path {str(relative)[:80]!r}")
    try:
        return Path(repository.download_artifacts(str(path), str(destination)))
    except (MlflowException, OSError) as exc:
        raise KdsecError(f"version {version} of '{name}': checkpoint download failed ({str(exc).splitlines()[0]})") from None
