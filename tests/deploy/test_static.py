"""Container and deployment files, checked without a container engine against the native team
stack (``deployments/stack.py`` and ``stack.env``), which is the reference topology."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deployments"))

import stack  # noqa: E402

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PREFECT_YAML = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
SETTINGS = stack._parse_env(stack.SETTINGS_FILE)  # the file itself, whatever this shell exports
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# Compose's interpolation: $$ is a dollar, ${NAME}, ${NAME:?message}, ${NAME:-default} a variable.
REFERENCE = re.compile(r"\$\$|\$\{(\w+)(?::?[?-][^}]*)?\}")


@pytest.fixture
def secret(tmp_path, monkeypatch) -> dict[str, str]:
    """What the native stack generates: the same names the compose stack takes from the environment."""
    monkeypatch.setenv("KDSEC_STACK_DIR", str(tmp_path / "stack"))
    return stack.stack_secrets(SETTINGS)


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _references(text: str) -> list[str]:
    return [match.group(1) for match in REFERENCE.finditer(text) if match.group(1)]


def _interpolate(text: str, values: dict[str, str]) -> str:
    return REFERENCE.sub(lambda match: values[match.group(1)] if match.group(1) else "$", text)


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *command], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=60)


# --- the deployment ------------------------------------------------------------------------------


def test_prefect_yaml_declares_a_scheduled_kd_pipeline_deployment():
    deployment = PREFECT_YAML["deployments"][0]
    module, function = deployment["entrypoint"].split(":")
    assert (ROOT / module).is_file() and f"def {function}(" in (ROOT / module).read_text()
    assert deployment["schedules"][0]["cron"].count(" ") == 4
    assert (ROOT / deployment["parameters"]["config_path"]).is_file()


def test_prefect_yaml_pulls_into_the_project_the_image_copies_to_app():
    (step,) = PREFECT_YAML["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $KDSEC_PROJECT_DIR }}"
    assert "KDSEC_PROJECT_DIR=/app" in DOCKERFILE
    for deployment in PREFECT_YAML["deployments"]:
        assert deployment["work_pool"]["name"] == SETTINGS["KDSEC_WORK_POOL"]
        for path in (deployment["entrypoint"].split(":")[0], deployment["parameters"]["config_path"]):
            assert (ROOT / path).is_file()  # relative to the repository root, which is /app in the image
            folder = Path(path).parts[0]
            assert DOCKERFILE.index("WORKDIR /app") < DOCKERFILE.index(f"COPY {folder} ./{folder}\n")


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_installs_from_the_lock_and_copies_the_project():
    assert "uv sync --frozen" in DOCKERFILE
    for folder in ("kdsec", "tasks", "flows", "configs", "deployments"):
        assert f"COPY {folder} ./{folder}\n" in DOCKERFILE
    assert "USER kdsec" in DOCKERFILE
    assert "chown -R kdsec /data" in DOCKERFILE and "KDSEC_WORKDIR=/data" in DOCKERFILE
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in DOCKERFILE


def test_dockerfile_bakes_in_no_secret():
    for secret_name in ("KDSEC_MODEL_KEY", "KDSEC_SIGNING_KEY", "PASSWORD", "SECRET_KEY", ".key", ".pem"):
        assert secret_name not in DOCKERFILE
    assert not re.search(r"^\s*(ADD|COPY)\s+\.\s", DOCKERFILE, re.M)  # only named folders, never the whole tree
    assert not re.search(r"^\s*ARG\s", DOCKERFILE, re.M)
    ignored = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".stack", ".kdsec", ".venv", "**/*.key", "**/*.pem", "**/*.env"} <= set(ignored)


# --- the compose stack against the native one ----------------------------------------------------


def test_every_service_reads_the_shared_settings():
    assert {"postgres", "prefect-server", "mlflow", "provision", "worker"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert (ROOT / "docker" / service["env_file"]).resolve() == stack.SETTINGS_FILE, name
    for name in ("prefect-server", "mlflow", "provision", "worker"):  # one image, with the lock
        assert SERVICES[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_variables_are_stack_settings_or_the_native_secrets(secret):
    referenced = {name for text in _strings(COMPOSE) for name in _references(text)}
    assert referenced <= set(SETTINGS) | set(secret), referenced - set(SETTINGS) - set(secret)
    # Names come from stack.env, not re-typed: no setting's value appears literally.
    literals = [SETTINGS[key] for key in ("KDSEC_WORK_POOL", "KDSEC_PIPELINE_USER", "KDSEC_REGISTERED_MODEL",
                                          "KDSEC_REVIEWERS_ROLE")] + stack.reviewers(SETTINGS)
    for literal in literals:
        assert not any(literal in text for text in _strings(COMPOSE)), literal
    # The header says which secrets to export: every one this file needs.
    header = (ROOT / "docker" / "compose.yaml").read_text().split("\nx-kdsec", 1)[0]
    needed = (referenced - set(SETTINGS)) | {spec["environment"] for spec in COMPOSE["secrets"].values()}
    assert all(name in header for name in needed), [name for name in needed if name not in header]


def test_databases_users_and_urls_are_the_native_ones(secret):
    values = {**SETTINGS, **secret}
    native_host = f"127.0.0.1:{SETTINGS['KDSEC_PG_PORT']}"

    def in_compose(driver: str, database: str) -> str:
        return stack.pg_url(SETTINGS, secret, driver, SETTINGS[database]).replace(native_host, "postgres:5432")

    postgres = {key: _interpolate(value, values) for key, value in SERVICES["postgres"]["environment"].items()}
    assert postgres["POSTGRES_USER"] == SETTINGS["KDSEC_PG_USER"]
    assert postgres["POSTGRES_DB"] == SETTINGS["KDSEC_PREFECT_DB"]
    assert postgres["POSTGRES_PASSWORD"] == secret["KDSEC_PG_PASSWORD"]
    init = next(volume for volume in SERVICES["postgres"]["volumes"] if "/docker-entrypoint-initdb.d/" in volume)
    script = ROOT / "docker" / init.split(":")[0]
    assert script.suffix == ".sh" and "${KDSEC_MLFLOW_DB" in script.read_text()  # the second database

    prefect_url = SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert _interpolate(prefect_url, values) == in_compose("asyncpg", "KDSEC_PREFECT_DB")
    mlflow_url = SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert _interpolate(mlflow_url, values) == in_compose("psycopg", "KDSEC_MLFLOW_DB")

    worker = SERVICES["worker"]
    user = SETTINGS["KDSEC_PIPELINE_USER"]
    assert _interpolate(worker["environment"]["MLFLOW_TRACKING_USERNAME"], values) == user
    assert _interpolate(worker["environment"]["MLFLOW_TRACKING_PASSWORD"], values) == secret[stack.password_key(user)]
    passwords = {key for key in SERVICES["provision"]["environment"] if key.startswith("KDSEC_PASSWORD_")}
    assert passwords == {stack.password_key(name) for name in stack.users(SETTINGS)}


def test_prefect_server_runs_on_postgresql_with_a_health_check():
    server = SERVICES["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert _option(server["command"], "--port") == "4200"
    assert "http://127.0.0.1:4200/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])


def test_mlflow_server_is_the_native_one():
    mlflow = SERVICES["mlflow"]
    argv = mlflow["command"]
    assert argv[:2] == ["mlflow", "server"] and "--backend-store-uri" not in argv  # the store URI holds a password
    assert _option(argv, "--app-name") == "basic-auth"
    assert _option(argv, "--workers") == "1"
    artifacts = _option(argv, "--artifacts-destination")
    assert any(artifacts.startswith(volume.split(":")[1] + "/") for volume in mlflow["volumes"])  # on a volume
    port = _option(argv, "--port")
    allowed = _option(argv, "--allowed-hosts").split(",")
    assert {f"mlflow:{port}", f"localhost:{port}", f"127.0.0.1:{port}"} <= set(allowed)
    for client in ("worker", "provision"):  # MLflow 3 refuses requests for another Host
        assert SERVICES[client]["environment"]["MLFLOW_TRACKING_URI"].removeprefix("http://") in allowed
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert not any("sqlite" in text for text in _strings(COMPOSE))
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"].endswith(".ini")
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(mlflow["environment"])
    assert {"KDSEC_REVIEWERS_ROLE", "KDSEC_REVIEWED_ALIASES", "KDSEC_FOUR_EYES"} <= set(SETTINGS)  # via env_file
    assert f"http://127.0.0.1:{port}/health" in " ".join(mlflow["healthcheck"]["test"])


def test_entrypoint_writes_the_auth_config_mlflow_reads(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    auth_ini = tmp_path / "auth" / "auth.ini"
    store = "postgresql+psycopg://kdsec:pw@postgres:5432/mlflow"
    result = _run_entrypoint({"KDSEC_SECRETS_DIR": str(tmp_path / "none"), "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                              "MLFLOW_BACKEND_STORE_URI": store}, "true")
    assert result.returncode == 0, result.stderr
    assert auth_ini.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(auth_ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    config = read_auth_config()
    assert config.authorization_function == "kdsec.mlflow_auth:authenticate"
    assert (config.database_uri, config.admin_username, config.default_permission) == (store, "admin", "READ")
    assert config.admin_password == "from-the-environment" and "from-the-environment" not in auth_ini.read_text()
    assert not config.grant_default_workspace_access


def test_provision_runs_the_native_provision_against_the_compose_server(monkeypatch):
    service = SERVICES["provision"]
    assert service["command"] == ["python", "/app/docker/provision.py"]
    assert service["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert SERVICES["worker"]["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    spec = importlib.util.spec_from_file_location("compose_provision", ROOT / "docker" / "provision.py")
    provision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provision)
    calls = []
    monkeypatch.setattr(provision.stack, "provision", lambda *args, **kwargs: calls.append((args, kwargs)))
    environment = {key: f"{key}-value" for key in service["environment"] if key != "MLFLOW_TRACKING_URI"}
    for key, value in {**environment, "MLFLOW_TRACKING_URI": service["environment"]["MLFLOW_TRACKING_URI"]}.items():
        monkeypatch.setenv(key, value)
    assert provision.main() == 0
    ((config, passwords), options), = calls
    assert config == stack.settings() and passwords == environment
    assert options == {"mlflow_url": "http://mlflow:5000"}


def test_native_provision_takes_the_compose_server_url():
    # stack.urls() is the native loopback address; in compose the server is http://mlflow:5000.
    assert inspect.signature(stack.provision).parameters["mlflow_url"].default is None


def test_provision_without_passwords_says_which_in_one_line(tmp_path):
    env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    result = subprocess.run([sys.executable, str(ROOT / "docker" / "provision.py")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr
    assert stack.password_key(SETTINGS["KDSEC_PIPELINE_USER"]) in result.stderr


def test_worker_deploys_from_app_and_runs_in_data():
    worker = SERVICES["worker"]
    script = worker["command"][-1]
    assert worker["command"][:2] == ["sh", "-ec"]
    deploy = "cd /app && KDSEC_PROJECT_DIR=/app prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all"
    assert deploy in script
    pool = _interpolate(script, SETTINGS)
    assert f"prefect work-pool create \"{SETTINGS['KDSEC_WORK_POOL']}\" --type process" in pool
    assert f"exec prefect worker start --pool \"{SETTINGS['KDSEC_WORK_POOL']}\" --type process" in pool
    assert worker["environment"]["KDSEC_WORKDIR"] == "/data" and worker["environment"]["KDSEC_PROJECT_DIR"] == "/app"
    assert "runs:/data" in worker["volumes"]
    server_port = _option(SERVICES["prefect-server"]["command"], "--port")
    assert worker["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
    assert {name: dep["condition"] for name, dep in worker["depends_on"].items()} == {
        "prefect-server": "service_healthy", "mlflow": "service_healthy", "provision": "service_completed_successfully"}


# --- secrets -------------------------------------------------------------------------------------


def test_compose_has_no_literal_secrets(secret):
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in f"{key} {value}".lower() for word in ("password", "key", "secret", "token")):
                variables = _references(str(value))
                assert variables and set(variables) <= set(SETTINGS) | set(secret), (name, key)
                if not value.startswith("postgresql"):
                    assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (name, key)  # required, never defaulted
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # Prefect's API has no authentication
    for text in _strings(COMPOSE):  # credentials in URLs: variables only
        for password in re.findall(r"://[^/\s:@]+:([^@\s]+)@", text):
            assert password.startswith("${KDSEC_PG_PASSWORD:?"), text


def test_keys_reach_the_worker_as_secret_files_owned_by_the_image_user():
    uid = re.search(r"useradd [^\n]*--uid (\d+) kdsec", DOCKERFILE).group(1)
    mounts = {mount["target"]: mount for mount in SERVICES["worker"]["secrets"]}
    assert set(mounts) == {"KDSEC_MODEL_KEY", "KDSEC_SIGNING_KEY"}
    for target, mount in mounts.items():
        assert COMPOSE["secrets"][mount["source"]] == {"environment": target}  # from the host's environment
        assert (mount["uid"], mount["gid"], mount["mode"]) == (uid, uid, 0o400)
    for service in SERVICES.values():
        assert not {"KDSEC_MODEL_KEY", "KDSEC_SIGNING_KEY"} & set(service.get("environment") or {})


def test_entrypoint_exports_secret_files_as_the_keys_kdsec_reads(tmp_path):
    from kdsec.crypto.keys import generate_key_file

    secrets_dir = tmp_path / "secrets"
    generate_key_file(secrets_dir / "KDSEC_MODEL_KEY", "kek")
    generate_key_file(secrets_dir / "KDSEC_SIGNING_KEY", "signing")  # also writes KDSEC_SIGNING_KEY.pub: not a name
    check = ("import json, os; from kdsec.crypto.keys import load_or_create_signer, local_key_provider; "
             "local_key_provider('KDSEC_MODEL_KEY', '/nonexistent/model.key', create=False); "
             "load_or_create_signer('KDSEC_SIGNING_KEY', '/nonexistent/signing.pem'); "
             "print(json.dumps({k: os.environ.get(k) for k in ('KDSEC_MODEL_KEY', 'KDSEC_SIGNING_KEY')}))")
    result = _run_entrypoint({"KDSEC_SECRETS_DIR": str(secrets_dir)}, sys.executable, "-c", check)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    assert exported == {name: (secrets_dir / name).read_text().rstrip("\n") for name in exported}

    (secrets_dir / "KDSEC_MODEL_KEY").write_text("")
    result = _run_entrypoint({"KDSEC_SECRETS_DIR": str(secrets_dir)}, "true")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: the secret KDSEC_MODEL_KEY is empty: export KDSEC_MODEL_KEY before docker compose up "
        "(see docker/compose.yaml)"]
