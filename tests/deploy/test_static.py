"""Container and deployment files are checked statically (no Docker engine here)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_a_scheduled_kd_pipeline_deployment():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deployment = spec["deployments"][0]
    module, function = deployment["entrypoint"].split(":")
    assert (ROOT / module).is_file() and f"def {function}(" in (ROOT / module).read_text()
    assert deployment["schedules"][0]["cron"].count(" ") == 4
    assert (ROOT / deployment["parameters"]["config_path"]).is_file()


def test_compose_has_the_team_stack_and_no_literal_secrets():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"postgres", "prefect-server", "mlflow", "worker"} <= set(compose["services"])
    assert "postgresql" in compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for service in compose["services"].values():
        for value in (service.get("environment") or {}).values():
            if any(word in str(value).lower() for word in ("password", "key")):
                assert "${" in str(value)


def test_dockerfile_installs_from_the_lock_and_copies_the_project():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "uv sync --frozen" in dockerfile
    for folder in ("kdsec", "tasks", "flows", "configs"):
        assert f"COPY {folder} " in dockerfile
    assert "USER kdsec" in dockerfile
