"""Container and deployment files, checked without a container engine against the native team
stack (``deployments/stack.py`` and ``stack.env``), which is the reference topology."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
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
        "prefect-server": "service_healthy", "mlflow": "service_healthy", "provision": "service_completed_successfully",
        "dask-scheduler": "service_healthy"}


# --- secrets -------------------------------------------------------------------------------------

# A name that holds a secret: one of these words inside a part of it, a part ending in TOKEN, or a
# part that is KEY, PASS, PWD... (parts: split at _, -, . and camelCase; KEYBOARD is no key).
_SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|CREDENTIAL|APIKEY|PRIVATEKEY|ACCESSKEY|TOKENS?$")
_SECRET_PARTS = {"KEY", "KEYS", "PASS", "PWD", "PW", "PSK"}
_RUN_SECRETS = "/run/secrets"
_COMMANDS = ("command", "entrypoint", "healthcheck")  # keys under a service whose strings a shell may run
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*")
_ASSIGNMENT = re.compile(r"(?:^|(?<=[\s'\"(;&|]))(-{0,2}[A-Za-z_][\w.-]*)=([^\s'\";&|)]*)")


def _name_parts(name: str) -> list[str]:
    return [part for part in re.split(r"[^A-Z0-9]+", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()) if part]


def _secret_name(name: str) -> bool:
    return any(_SECRET_WORDS.search(part) or part in _SECRET_PARTS for part in _name_parts(name))


def _closing(text: str, start: int, opening: str, closing: str) -> int | None:
    """The index after the ``closing`` that matches ``text[start] == opening`` (nesting counted)."""
    depth = 0
    for index in range(start, len(text)):
        depth += {opening: 1, closing: -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    return None


def _spans(text: str, shell: bool) -> list[tuple[int, int, list[str]]]:
    """(start, end, defaults) of every variable reference in ``text``: compose's ``${NAME}``,
    ``${NAME:?message}``, ``${NAME:-default}`` (the default is typed in: it is returned to be checked
    too), ``$NAME``; ``$$`` is compose's literal dollar, and where a shell runs the string
    (``shell``) ``$$NAME``, ``$${...}`` and ``$$(...)`` are references the shell resolves."""
    found, index = [], 0
    while (index := text.find("$", index)) >= 0:
        start, escaped = index, text.startswith("$$", index)
        index += 2 if escaped else 1
        if escaped and not shell:
            continue
        if text.startswith("{", index) and (end := _closing(text, index, "{", "}")):
            inner = text[index + 1:end - 1]
            name = re.match(r"[A-Za-z_]\w*|[0-9#?*@!$-]", inner)
            modifier = re.match(r":?[-+]", inner[name.end():]) if name else None  # a default, not a ?message
            found.append((start, end, [inner[name.end() + modifier.end():]] if modifier else []))
            index = end
        elif escaped and text.startswith("(", index) and (end := _closing(text, index, "(", ")")):
            found.append((start, end, []))  # $$(command): the shell's command substitution
            index = end
        elif name := re.match(r"[A-Za-z_]\w*" if not escaped else r"[A-Za-z_]\w*|[0-9#?*@!$-]", text[index:]):
            found.append((start, index + name.end(), []))
            index += name.end()
    return found


def _literal_text(text: str, shell: bool = False) -> str:
    """What of ``text`` is typed in: the text less its variable references (plus their defaults)."""
    parts, previous = [], 0
    for start, end, defaults in _spans(text, shell):
        parts += [text[previous:start], *(_literal_text(default, shell) for default in defaults)]
        previous = end
    return "".join([*parts, text[previous:]])


def _is_literal(value: str, shell: bool = False) -> bool:
    return bool(re.sub(r"[\s'\"]", "", _literal_text(value, shell)))


def _masked(text: str, shell: bool) -> tuple[str, list[str]]:
    """``text`` with each reference replaced by a placeholder (\\0index\\0) free of : @ / and spaces."""
    references, masked, previous = [], [], 0
    for start, end, _ in _spans(text, shell):
        masked += [text[previous:start], f"\0{len(references)}\0"]
        references.append(text[start:end])
        previous = end
    return "".join([*masked, text[previous:]]), references


def _unmasked(text: str, references: list[str]) -> str:
    return re.sub(r"\0(\d+)\0", lambda match: references[int(match.group(1))], text)


def _secret_value(where: str, name: str, value, shell: bool = False) -> list[str]:
    """A secret-named variable given a typed-in value (not a reference, not empty, not a *_FILE in
    /run/secrets); a variable without a value (passed through from the host) is fine."""
    if value is None or not _secret_name(str(name)):
        return []
    value = str(value)  # YAML makes 123456 an int
    in_run_secrets = value == _RUN_SECRETS or value.startswith(_RUN_SECRETS + "/")
    if _name_parts(str(name))[-1] in ("FILE", "DIR") and in_run_secrets:
        return []
    return [f"{where}: {name}"] if _is_literal(value, shell) else []


def _urls(text: str, shell: bool = False):
    """(password or None, query parameters) of each URL in ``text``, references kept whole."""
    masked, references = _masked(text, shell)
    for url in _URL.findall(masked):
        user_info, at, _ = re.match(r"[^/?#]*", url.split("://", 1)[1]).group().rpartition("@")
        password = _unmasked(user_info.split(":", 1)[1], references) if at and ":" in user_info else None
        yield password, [(name, _unmasked(value, references))
                         for name, value in re.findall(r"[?&;]([^=&#]+)=([^&#]*)", url)]


def _url_passwords(where: str, text: str, shell: bool = False) -> list[str]:
    """URLs with a typed-in password: scheme://user:password@host, or ?password=... in the query."""
    findings = []
    for password, query in _urls(text, shell):
        if password is not None and _is_literal(password, shell):
            findings.append(f"{where}: a password in a URL")
        for name, value in query:
            findings += _secret_value(f"{where}: a URL's query", name, value, shell)
    return findings


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # not shell syntax (an unbalanced quote): words are enough here
        return text.split()


def _command_secrets(where: str, node) -> list[str]:
    """In what a shell or an exec form runs: NAME=literal (PGPASSWORD=..., --password=..., a
    libpq 'password=...') and --secret-flag literal."""
    if isinstance(node, dict):  # a health check: its test
        node = node.get("test") or []
    items = [node] if isinstance(node, str) else [str(item) for item in node]
    findings, word_lists = [], [items if isinstance(node, list) else []]
    for text in items:
        masked, references = _masked(text, shell=True)
        for name, value in _ASSIGNMENT.findall(masked):
            findings += _secret_value(where, name, _unmasked(value, references), shell=True)
        word_lists.append([_unmasked(word, references) for word in _words(masked)])
    for words in word_lists:
        for flag, value in zip(words, words[1:]):
            if flag.startswith("-") and "=" not in flag and not value.startswith("-"):
                findings += _secret_value(where, flag, value, shell=True)
    return findings


def _paths(node, path=()):
    """(path, string) for every string in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, str(index)))
    elif isinstance(node, str):
        yield path, node


def _variables(node) -> list[tuple[str, object]]:
    """(name, value) of an environment or build args block, as a mapping or as a KEY=VALUE list
    (a bare KEY, or a null value, is passed through from the host's environment)."""
    if isinstance(node, dict):
        return list(node.items())
    return [(name, value[0] if value else None) for name, *value in (str(item).split("=", 1) for item in node or [])]


def literal_secrets(compose_text: str) -> list[str]:
    """Where a compose file types in a secret: a secret-named variable (environment, build args,
    NAME=... in a command, entrypoint or health check) with a literal value, or a URL anywhere with
    a literal password. References to the host's environment and /run/secrets files are fine."""
    document = yaml.safe_load(compose_text) or {}
    findings = []
    for path, text in _paths(document):
        shell = len(path) > 2 and path[0] == "services" and path[2] in _COMMANDS
        findings += _url_passwords(".".join(path), text, shell)
    for service_name, service in (document.get("services") or {}).items():
        build = service.get("build") if isinstance(service.get("build"), dict) else {}
        for block, variables in (("environment", service.get("environment")), ("build.args", build.get("args"))):
            for name, value in _variables(variables):
                findings += _secret_value(f"services.{service_name}.{block}", name, value)
        for key in _COMMANDS:
            if service.get(key) is not None:
                findings += _command_secrets(f"services.{service_name}.{key}", service[key])
    return sorted(set(findings))


def dockerfile_literal_secrets(dockerfile_text: str) -> list[str]:
    """Where a Dockerfile bakes in a secret: ENV NAME=literal (or ENV NAME literal), an ARG with a
    literal default, NAME=literal or --secret-flag literal in RUN/CMD/ENTRYPOINT/HEALTHCHECK, or a
    URL with a literal password."""
    lines, start = [], None  # logical lines: continuations joined, comment lines dropped
    for number, line in enumerate(dockerfile_text.splitlines(), 1):
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if start is None:
            start, pieces = number, []
        pieces.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            lines.append((start, " ".join(pieces)))
            start = None
    findings = []
    for number, line in lines:
        instruction, _, arguments = line.strip().partition(" ")
        instruction, where = instruction.upper(), f"line {number}"
        findings += _url_passwords(where, arguments)
        if instruction in ("ENV", "ARG"):
            words = _words(arguments)
            if instruction == "ENV" and words and "=" not in words[0]:  # the old form: ENV NAME value
                pairs = [(words[0], " ".join(words[1:]))]
            else:
                pairs = _variables(words)
            for name, value in pairs:
                findings += _secret_value(f"{where}: {instruction}", name, value)
        elif instruction in ("RUN", "CMD", "ENTRYPOINT", "HEALTHCHECK"):
            findings += _command_secrets(where, arguments)
    return sorted(set(findings))


# Literal secrets, each with what the detector reports (where, never the value).
_LITERAL_SECRETS = {
    "mapping": ("services: {db: {environment: {POSTGRES_PASSWORD: hunter2}}}",
                "services.db.environment: POSTGRES_PASSWORD"),
    "list": ("services: {worker: {environment: [MLFLOW_TRACKING_PASSWORD=abc123]}}",
             "services.worker.environment: MLFLOW_TRACKING_PASSWORD"),
    "cloud key": ("services: {worker: {environment: {AWS_SECRET_ACCESS_KEY: AKIAIOSFODNN7EXAMPLE}}}",
                  "services.worker.environment: AWS_SECRET_ACCESS_KEY"),
    "number": ("services: {db: {environment: {POSTGRES_PASSWORD: 123456}}}",
               "services.db.environment: POSTGRES_PASSWORD"),
    "URL": ("services: {mlflow: {environment: {MLFLOW_BACKEND_STORE_URI: 'postgresql://kdsec:hunter2@db/kdsec'}}}",
            "services.mlflow.environment.MLFLOW_BACKEND_STORE_URI: a password in a URL"),
    "URL query": ("services: {x: {environment: {DATABASE_URL: 'postgresql://db/kdsec?user=kdsec&password=hunter2'}}}",
                  "services.x.environment.DATABASE_URL: a URL's query: password"),
    "URL, part typed": ("services: {x: {environment: {DB: 'postgresql://kdsec:pre${PG_PASS}@db/kdsec'}}}",
                        "services.x.environment.DB: a password in a URL"),
    "default": ("services: {db: {environment: {POSTGRES_PASSWORD: '${PG_PASS:-hunter2}'}}}",
                "services.db.environment: POSTGRES_PASSWORD"),
    "nested default": ("services: {db: {environment: {POSTGRES_PASSWORD: '${A:-${B:-hunter2}}'}}}",
                       "services.db.environment: POSTGRES_PASSWORD"),
    "part typed": ("services: {db: {environment: {POSTGRES_PASSWORD: 'pre-${PG_PASS:?set it}'}}}",
                   "services.db.environment: POSTGRES_PASSWORD"),
    "$$ is a dollar": ("services: {db: {environment: {POSTGRES_PASSWORD: $$PG_PASS}}}",
                       "services.db.environment: POSTGRES_PASSWORD"),
    "file elsewhere": ("services: {db: {environment: {POSTGRES_PASSWORD_FILE: ./pg-password.txt}}}",
                       "services.db.environment: POSTGRES_PASSWORD_FILE"),
    "camelCase": ("services: {x: {environment: {apiToken: abc123}}}", "services.x.environment: apiToken"),
    "build arg": ("services: {x: {build: {context: ., args: [GITHUB_TOKEN=ghp_abc123]}}}",
                  "services.x.build.args: GITHUB_TOKEN"),
    "anchor": ("x-env: &env {POSTGRES_PASSWORD: hunter2}\nservices: {db: {environment: *env}}",
               "services.db.environment: POSTGRES_PASSWORD"),
    "command URL": ("services: {x: {command: [mlflow, server, --backend-store-uri, 'postgresql://k:hunter2@db/m']}}",
                    "services.x.command.3: a password in a URL"),
    "command assignment": ("services: {x: {command: [sh, -c, 'PGPASSWORD=hunter2 psql -h db']}}",
                           "services.x.command: PGPASSWORD"),
    "command flag": ("services: {x: {command: [app, --password, hunter2]}}", "services.x.command: --password"),
    "command flag=": ("services: {x: {command: 'app --api-key=abc123'}}", "services.x.command: --api-key"),
    "entrypoint": ("services: {x: {entrypoint: 'env API_TOKEN=abc123 app'}}", "services.x.entrypoint: API_TOKEN"),
    "libpq string": ("services: {x: {command: \"psql 'host=db user=kdsec password=hunter2'\"}}",
                     "services.x.command: password"),
    "health check": ("services: {db: {healthcheck: {test: [CMD-SHELL, 'pg_isready -d postgresql://k:pw@db/k']}}}",
                     "services.db.healthcheck.test.1: a password in a URL"),
    "anywhere": ("x-notes: {backup: 'postgresql://kdsec:hunter2@db/kdsec'}\nservices: {}",
                 "x-notes.backup: a password in a URL"),
}
_REFERENCES = {
    "required": "services: {db: {environment: {POSTGRES_PASSWORD: '${POSTGRES_PASSWORD:?set it}'}}}",
    "plain": "services: {db: {environment: ['POSTGRES_PASSWORD=${PG_PASS}', API_TOKEN=$API_TOKEN]}}",
    "secret file": "services: {db: {environment: {POSTGRES_PASSWORD_FILE: /run/secrets/pg}}}",
    "from the host": "services: {db: {environment: [POSTGRES_PASSWORD], build: {args: {GITHUB_TOKEN: null}}}}",
    "empty": "services: {db: {environment: {POSTGRES_PASSWORD: '', API_TOKEN: null}}}",
    "default is a reference": "services: {db: {environment: {POSTGRES_PASSWORD: '${A:-${B:?set it}}'}}}",
    "URL without a password": "services: {x: {environment: {DB: 'postgresql://kdsec@db/kdsec'}}}",
    "URL with a reference": "services: {x: {environment: {DB: 'postgresql://kdsec:${PG_PASS}@db/kdsec'}}}",
    "URL, message with spaces": "services: {x: {environment: {DB: 'postgresql://${U:?a b: c}:${P:?x y}@db/k'}}}",
    "not secret names": "services: {x: {environment: {KEYBOARD: us, TOKENIZER: bert, AUTH_CONFIG_PATH: /a.ini}}}",
    "shell reference": "services: {x: {command: [sh, -ec, 'PGPASSWORD=$$PG_PASS psql; T=$$(cat /run/secrets/t) x']}}",
    "flag from a file": "services: {x: {command: [app, --password-file, /run/secrets/pg, --token, '${TOKEN:?set}']}}",
}
_DOCKERFILE_SECRETS = {
    "ENV": ("FROM python\nENV POSTGRES_PASSWORD=hunter2\n", "line 2: ENV: POSTGRES_PASSWORD"),
    "old ENV": ("FROM python\nENV DB_PASSWORD hunter2\n", "line 2: ENV: DB_PASSWORD"),
    "continued ENV": ("FROM python\nENV A=1 \\\n    # a comment\n    API_KEY=abc123\n", "line 2: ENV: API_KEY"),
    "quoted ENV": ("FROM python\nENV SECRET_KEY=\"abc 123\"\n", "line 2: ENV: SECRET_KEY"),
    "ARG default": ("FROM python\nARG GITHUB_TOKEN=ghp_abc123\n", "line 2: ARG: GITHUB_TOKEN"),
    "RUN": ("FROM python\nRUN PGPASSWORD=hunter2 psql -h db\n", "line 2: PGPASSWORD"),
    "URL": ("FROM python\nRUN pip install --index-url https://user:tok123@pypi.example/simple kdsec\n",
            "line 2: a password in a URL"),
}
_DOCKERFILE_FINE = {
    "ARG without default": "FROM python\nARG GITHUB_TOKEN\n",
    "file": "FROM python\nENV PASSWORD_FILE=/run/secrets/pg\n",
    "reference": "FROM python\nARG A\nENV API_TOKEN=${A} PATH=\"/app/.venv/bin:$PATH\"\n",
    "not secret": "FROM python\nENV KEYBOARD=us PIP_INDEX_URL=https://pypi.example/simple\n",
}


# Each detector against its known-bad cases (exactly the one finding) and known-good ones (none).
_FOUND = [(literal_secrets, case, *found) for case, found in _LITERAL_SECRETS.items()]
_FOUND += [(dockerfile_literal_secrets, case, *found) for case, found in _DOCKERFILE_SECRETS.items()]
_FINE = [(literal_secrets, case, text) for case, text in _REFERENCES.items()]
_FINE += [(dockerfile_literal_secrets, case, text) for case, text in _DOCKERFILE_FINE.items()]


@pytest.mark.parametrize("detector,case,text,finding", _FOUND, ids=[f"{d.__name__}:{c}" for d, c, *_ in _FOUND])
def test_literal_secrets_are_found(detector, case, text, finding):
    assert detector(text) == [finding]


@pytest.mark.parametrize("detector,case,text", _FINE, ids=[f"{d.__name__}:{c}" for d, c, _ in _FINE])
def test_references_are_not_literal_secrets(detector, case, text):
    assert detector(text) == [], case


def test_literal_secrets_say_where_not_what():
    found = literal_secrets("services: {db: {environment: {POSTGRES_PASSWORD: hunter2, "
                            "U: 'postgresql://k:hunter2@db/k'}}}")
    assert found == ["services.db.environment.U: a password in a URL", "services.db.environment: POSTGRES_PASSWORD"]
    assert not any("hunter2" in finding for finding in found)


def test_compose_has_no_literal_secrets():
    assert literal_secrets((ROOT / "docker" / "compose.yaml").read_text()) == []


def test_dockerfiles_and_settings_have_no_literal_secrets():
    dockerfiles = [path for path in (ROOT / "docker").glob("Dockerfile*") if path.suffix != ".dockerignore"]
    assert dockerfiles
    for path in dockerfiles:
        assert dockerfile_literal_secrets(path.read_text()) == [], path.name
    assert [name for name, value in SETTINGS.items() if _secret_value("stack.env", name, value)] == []


def test_compose_secrets_are_required_host_variables(secret):
    for name, service in SERVICES.items():
        for key, value in _variables(service.get("environment")):
            if _secret_name(key) or any(password is not None for password, _ in _urls(str(value))):
                variables = _references(str(value))
                assert variables and set(variables) <= set(SETTINGS) | set(secret), (name, key)
                if not value.startswith("postgresql"):
                    assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (name, key)  # required, never defaulted
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # Prefect's API has no authentication
    # Credentials in URLs: the PostgreSQL password, required (Prefect's and MLflow's database URLs).
    passwords = [password for text in _strings(COMPOSE) for password, _ in _urls(text) if password is not None]
    assert passwords and all(password.startswith("${KDSEC_PG_PASSWORD:?") for password in passwords), passwords


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


def test_the_he_host_serves_the_champion_to_token_holders_as_natively():
    """Compose's he-host is he_service.py's process: kdsec he-serve on the champion, the stack's host
    id, a token store (hashes only) as a secret file, the pipeline user's MLflow identity."""
    import he_service

    service = SERVICES["he-host"]
    argv = [_interpolate(part, SETTINGS) for part in service["command"]]
    assert argv[:2] == ["kdsec", "he-serve"]
    assert _option(argv, "--model-uri") == f"models:/{SETTINGS['KDSEC_REGISTERED_MODEL']}@champion"
    assert _option(argv, "--host-id") == SETTINGS["KDSEC_HE_HOST_ID"]
    mount = next(m for m in service["secrets"] if m["source"] == "kdsec_he_tokens")
    assert _option(argv, "--token-file") == f"/run/secrets/{mount['target']}" and mount["mode"] == 0o400
    assert COMPOSE["secrets"]["kdsec_he_tokens"] == {"environment": "KDSEC_HE_TOKENS"}
    assert _interpolate(service["environment"]["MLFLOW_TRACKING_USERNAME"], SETTINGS) == SETTINGS["KDSEC_PIPELINE_USER"]
    assert service["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert he_service.clients(SETTINGS) and he_service.url(SETTINGS).endswith(SETTINGS["KDSEC_HE_PORT"])


def test_the_dask_cluster_is_the_native_one_and_the_worker_s_runs_use_it(tmp_path, monkeypatch):
    """Compose's dask-scheduler and dask-worker are stack.py's dask_up(): the same port, threads,
    memory cap and worker count from stack.env, the same image (code and locked packages), no
    published port; the Prefect worker's runs get its address as KDSEC_DASK_ADDRESS."""
    scheduler, worker = SERVICES["dask-scheduler"], SERVICES["dask-worker"]
    argv = [_interpolate(part, SETTINGS) for part in scheduler["command"]]
    assert argv[:2] == ["dask", "scheduler"] and _option(argv, "--port") == SETTINGS["KDSEC_DASK_PORT"]
    assert "ports" not in scheduler and "ports" not in worker  # no authentication on Dask's TCP
    argv = [_interpolate(part, SETTINGS) for part in worker["command"]]
    assert argv[:3] == ["dask", "worker", f"tcp://dask-scheduler:{SETTINGS['KDSEC_DASK_PORT']}"]
    assert _option(argv, "--nthreads") == SETTINGS["KDSEC_DASK_THREADS"]
    assert _option(argv, "--memory-limit") == SETTINGS["KDSEC_DASK_MEMORY"]
    assert _interpolate(worker["deploy"]["replicas"], SETTINGS) == SETTINGS["KDSEC_DASK_WORKERS"]
    for service in (scheduler, worker):
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    address = _interpolate(SERVICES["worker"]["environment"]["KDSEC_DASK_ADDRESS"], SETTINGS)
    assert address == f"tcp://dask-scheduler:{SETTINGS['KDSEC_DASK_PORT']}"
    assert SERVICES["worker"]["depends_on"]["dask-scheduler"] == {"condition": "service_healthy"}
    # natively: the same settings on loopback, handed to the Prefect worker's runs
    monkeypatch.setenv("KDSEC_STACK_DIR", str(tmp_path))
    native = stack.worker_env(SETTINGS, {stack.password_key(SETTINGS["KDSEC_PIPELINE_USER"]): "x"})
    assert native["KDSEC_DASK_ADDRESS"] == stack.dask_address(SETTINGS) == f"tcp://127.0.0.1:{SETTINGS['KDSEC_DASK_PORT']}"
    assert len(stack.dask_workers(SETTINGS)) == int(SETTINGS["KDSEC_DASK_WORKERS"])
