"""The compose stack's one-shot provisioning: ``deployments/stack.py``'s ``provision()`` (MLflow
users, the experiment, the registered model, permissions and the reviewers role; idempotent),
run against the MLflow server at ``$MLFLOW_TRACKING_URI`` with the passwords from the environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deployments"))

import stack  # noqa: E402


def main() -> int:
    config = stack.settings()
    url = os.environ.get("MLFLOW_TRACKING_URI", "")
    wanted = ["MLFLOW_AUTH_ADMIN_PASSWORD", *(stack.password_key(user) for user in stack.users(config))]
    missing = [key for key in wanted if not os.environ.get(key)] + ([] if url else ["MLFLOW_TRACKING_URI"])
    if missing:
        print(f"error: {', '.join(missing)} not set: export them before docker compose up "
              "(see docker/compose.yaml's header)", file=sys.stderr)
        return 1
    from mlflow.exceptions import MlflowException

    try:
        stack.provision(config, {key: os.environ[key] for key in wanted}, mlflow_url=url)
    except MlflowException as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: provisioning {url} failed: {reason} (passwords are fixed at the first start: "
              "export the same ones, or start over with docker compose down -v)", file=sys.stderr)
        return 1
    print(f"provisioned {url}: users {', '.join(stack.users(config))}, experiment {config['KDSEC_EXPERIMENT']}, "
          f"model {config['KDSEC_REGISTERED_MODEL']}, role {config['KDSEC_REVIEWERS_ROLE']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
