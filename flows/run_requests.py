"""Deployed runs for authenticated run requests (``kdsec trigger``), and the parameters the
repository pins for each deployment. (Not ``requests.py``: Prefect puts this folder on sys.path
when it loads a flow file, and the module would shadow the requests library.)

Prefect's API authenticates nobody: a deployment's stored parameters can be changed by whoever
reaches it. The parameters that count are the ones ``deployments/prefect.yaml`` declares, reviewed
in git: a request starts from them, and a scheduled run counts as the schedule's only with them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kdsec.errors import KdsecError
from kdsec.fileio import read_bounded

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def pinned_parameters(deployment: str) -> dict:
    """The parameters ``deployments/prefect.yaml`` declares for FLOW/DEPLOYMENT (or DEPLOYMENT)."""
    name = deployment.rsplit("/", 1)[-1]
    document = yaml.safe_load(read_bounded(PREFECT_YAML, 1 << 20, "deployments/prefect.yaml")) or {}
    declared = [entry for entry in document.get("deployments") or [] if isinstance(entry, dict)]
    for entry in declared:
        if entry.get("name") == name:
            return dict(entry.get("parameters") or {})
    raise KdsecError(f"deployments/prefect.yaml declares no deployment '{name}' "
                     f"(it declares: {', '.join(str(entry.get('name')) for entry in declared) or 'none'})")


def start_requested_run(deployment: str, config_path: str, overrides: list[str], request_run_id: str) -> str:
    """Start a run of ``deployment`` (FLOW/DEPLOYMENT on ``PREFECT_API_URL``) for run request
    ``request_run_id`` (see ``kdsec.tracking.create_run_request``); return the flow run's id."""
    from prefect.deployments import run_deployment

    try:
        flow_run = run_deployment(deployment, parameters={"config_path": config_path, "overrides": overrides,
                                                          "request_run_id": request_run_id}, timeout=0)
    except Exception as exc:  # noqa: BLE001 — Prefect's errors: unknown deployment, unreachable API
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise KdsecError(f"Prefect did not start {deployment}: {message[:200]}") from None
    return str(flow_run.id)
