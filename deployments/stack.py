"""The team stack, started natively on loopback: PostgreSQL (a cluster in a project folder), a
Prefect server on it, an MLflow tracking server on it (basic-auth with kdsec's review rules,
artifacts proxied to a served store), a Dask scheduler and workers (where the worker's flow runs
train reference models and evaluate HE chunks: ``compute.dask_address``) and a Prefect process
worker.

    python deployments/stack.py up       # idempotent; prints the URLs and how to act as a user
    python deployments/stack.py he-up    # the HE host, once the registry has a champion (he_service.py)
    python deployments/stack.py status
    python deployments/stack.py down     # stops only what it started, by PID

Settings come from ``deployments/stack.env`` (shared with ``docker/compose.yaml``), overridden by
environment variables of the same names; state, PIDs, logs and generated secrets live under
``.stack/`` (or ``$KDSEC_STACK_DIR``). Secrets are generated once into ``.stack/secrets.env``
(0600) and never printed. Run it with the project's environment (``make stack-up``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import he_service  # the HE host (deployments/he_service.py); it imports this module back lazily
from dask_service import dask_address, dask_up, dask_workers  # the Dask cluster; it imports this module back lazily

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's environment: prefect, mlflow, kdsec
SETTINGS_FILE = ROOT / "deployments" / "stack.env"
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
         "PYTHONUNBUFFERED": "1"}


class StackError(Exception):
    """One line that says what went wrong and what to do."""


def _parse_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def settings() -> dict[str, str]:
    """``stack.env``, each key overridden by an environment variable of the same name."""
    return {key: os.environ.get(key, value) for key, value in _parse_env(SETTINGS_FILE).items()}


def state_dir() -> Path:
    return Path(os.environ.get("KDSEC_STACK_DIR") or ROOT / ".stack").resolve()


def users(config: dict[str, str]) -> list[str]:
    return [config["KDSEC_PIPELINE_USER"], *reviewers(config)]


def reviewers(config: dict[str, str]) -> list[str]:
    return [name.strip() for name in config["KDSEC_REVIEWERS"].split(",") if name.strip()]


def password_key(user: str) -> str:
    return "KDSEC_PASSWORD_" + user.upper().replace("-", "_")


def stack_secrets(config: dict[str, str]) -> dict[str, str]:
    """Generated once (0600), reused afterwards; MLflow wants passwords of 12+ characters."""
    path = state_dir() / "secrets.env"
    known = _parse_env(path) if path.is_file() else {}
    wanted = ["KDSEC_PG_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
              *(password_key(user) for user in users(config))]
    if any(key not in known for key in wanted):
        known.update({key: secrets.token_urlsafe(24) for key in wanted if key not in known})
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("".join(f"{key}={value}\n" for key, value in known.items()))
    return known


def signing_key() -> tuple[Path, Path]:
    """The pipeline's signing key (created once, 0600, with its ``.pub``): it signs packages and
    verdict attestations on the worker; the MLflow server and reviewers get the public half only."""
    from kdsec.crypto.keys import generate_key_file, public_key_path

    path = state_dir() / "keys" / "pipeline-signing.pem"
    if not path.is_file():
        generate_key_file(path, "signing")
    return path, public_key_path(path)


def urls(config: dict[str, str]) -> dict[str, str]:
    return {"prefect": f"http://127.0.0.1:{config['KDSEC_PREFECT_PORT']}/api",
            "mlflow": f"http://127.0.0.1:{config['KDSEC_MLFLOW_PORT']}"}


# --- processes ---------------------------------------------------------------------------------


def _pid_file(name: str) -> Path:
    return state_dir() / "run" / f"{name}.pid"


def _log(name: str) -> Path:
    return state_dir() / "logs" / f"{name}.log"


def running(name: str) -> int | None:
    """The PID of service ``name`` if this stack started it and it still runs (the PID file
    records a marker of the command line, so a recycled PID is not taken for ours)."""
    path = _pid_file(name)
    if not path.is_file():
        return None
    pid_text, _, marker = path.read_text().partition("\n")
    try:
        command = Path(f"/proc/{int(pid_text)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{int(pid_text)}/stat").read_text().rsplit(") ", 1)[-1][:1]
    except (OSError, ValueError):
        return None
    return int(pid_text) if marker.strip() in command and state != "Z" else None


def spawn(name: str, argv: list[str], env: dict[str, str], marker: str) -> int:
    for folder in ("run", "logs"):
        (state_dir() / folder).mkdir(parents=True, exist_ok=True)
    with _log(name).open("ab") as log:
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(name).write_text(f"{process.pid}\n{marker}\n")
    deadline = time.monotonic() + 10  # until the child has exec'd its program (or died)
    while running(name) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.pid


def stop(name: str, grace: float = 15.0) -> bool:
    """SIGTERM the service's process group, SIGKILL what is left after ``grace`` seconds."""
    pid = running(name)
    if pid is None:
        _pid_file(name).unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if not _group_alive(pid):
            break
    _pid_file(name).unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _tail(name: str, lines: int = 6) -> str:
    path = _log(name)
    text = path.read_text(errors="replace").strip().splitlines()[-lines:] if path.is_file() else []
    return " | ".join(line.strip()[:200] for line in text)


def wait_http(name: str, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(name) is None:
            raise StackError(f"{name} exited during start-up; see {_log(name)}: {_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout:.0f} s; see {_log(name)}: {_tail(name)}")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def base_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "MLFLOW_TRACKING_", "KDSEC_PASSWORD_", "KDSEC_SIGNING_KEY",
                                  "KDSEC_MODEL_KEY", "KDSEC_VERDICT_PUBLIC_KEY"))}
    return {**env, **QUIET, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


# --- PostgreSQL ---------------------------------------------------------------------------------


def pg_bin() -> Path:
    """PostgreSQL's server binaries (≥ 14.9 for Prefect); installed from Debian when missing and allowed."""
    candidates = [Path(os.environ["KDSEC_PG_BIN"])] if os.environ.get("KDSEC_PG_BIN") else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: -float(p.parent.name))
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("PostgreSQL server binaries missing: apt-get install postgresql", flush=True)
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return pg_bin()
    raise StackError("PostgreSQL server binaries (initdb, pg_ctl) not found: install them (apt-get install "
                     "postgresql) or set KDSEC_PG_BIN to their folder")


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb refuses to run as root: as root, the cluster belongs to the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def pg_dir() -> Path:
    """``.stack/pg``; as root, a folder the ``postgres`` user can reach if the project's is not."""
    folder = state_dir() / "pg"
    if os.geteuid() != 0:
        return folder
    reachable = all(os.stat(parent).st_mode & 0o001 for parent in [*reversed(folder.parents)] if parent.exists())
    if reachable:
        return folder
    return Path("/var/tmp") / f"kdsec-stack-{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}" / "pg"


def _pg_env(secret: dict[str, str]) -> dict[str, str]:
    return {**base_env(), "PGPASSWORD": secret["KDSEC_PG_PASSWORD"]}


def postgres_up(config: dict[str, str], secret: dict[str, str]) -> None:
    binaries, folder = pg_bin(), pg_dir()
    data, run_dir = folder / "data", folder / "run"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                       check=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(run_dir, "postgres", "postgres")
    if not (data / "PG_VERSION").is_file():
        password_file = run_dir / "initdb.pw"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secret["KDSEC_PG_PASSWORD"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(password_file, "postgres", "postgres")
        try:
            _run(_as_postgres([str(binaries / "initdb"), "-D", str(data), "-U", config["KDSEC_PG_USER"],
                               f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8",
                               "--locale=C.UTF-8"]), "initdb")
        finally:
            password_file.unlink(missing_ok=True)
    status = subprocess.run(_as_postgres([str(binaries / "pg_ctl"), "-D", str(data), "status"]), capture_output=True)
    if status.returncode != 0:
        port = int(config["KDSEC_PG_PORT"])
        options = f"-p {port} -k {run_dir} -c listen_addresses=127.0.0.1"
        _run(_as_postgres([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-w",
                           "-t", "60", "-o", options, "start"]), "PostgreSQL start")
    for database in (config["KDSEC_PREFECT_DB"], config["KDSEC_MLFLOW_DB"]):
        query = [str(binaries / "psql"), "-h", "127.0.0.1", "-p", config["KDSEC_PG_PORT"], "-U",
                 config["KDSEC_PG_USER"], "-d", "postgres", "-tAc",
                 f"SELECT 1 FROM pg_database WHERE datname = '{database}'"]
        found = subprocess.run(query, capture_output=True, text=True, env=_pg_env(secret))
        if found.returncode != 0:
            raise StackError(f"PostgreSQL refused a query: {found.stderr.strip()[:200]}")
        if found.stdout.strip() != "1":
            _run([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", config["KDSEC_PG_PORT"], "-U",
                  config["KDSEC_PG_USER"], database], f"createdb {database}", env=_pg_env(secret))


def postgres_running() -> bool:
    data = pg_dir() / "data"
    if not (data / "PG_VERSION").is_file():
        return False
    try:
        binaries = pg_bin()
    except StackError:
        return False
    return subprocess.run(_as_postgres([str(binaries / "pg_ctl"), "-D", str(data), "status"]),
                          capture_output=True).returncode == 0


def postgres_down() -> bool:
    if not postgres_running():
        return False
    _run(_as_postgres([str(pg_bin() / "pg_ctl"), "-D", str(pg_dir() / "data"), "-m", "fast", "-w", "stop"]),
         "PostgreSQL stop")
    return True


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env or base_env())
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise StackError(f"{what} failed: {detail[-1][:300] if detail else f'exit {result.returncode}'}")


def pg_url(config: dict[str, str], secret: dict[str, str], driver: str, database: str) -> str:
    return (f"postgresql+{driver}://{config['KDSEC_PG_USER']}:{secret['KDSEC_PG_PASSWORD']}@127.0.0.1:"
            f"{config['KDSEC_PG_PORT']}/{database}")


# --- Prefect and MLflow -------------------------------------------------------------------------


def prefect_env(config: dict[str, str], home: str = "prefect") -> dict[str, str]:
    return {**base_env(), "PREFECT_HOME": str(state_dir() / home), "PREFECT_API_URL": urls(config)["prefect"]}


def prefect_up(config: dict[str, str], secret: dict[str, str]) -> None:
    if running("prefect-server") is None:
        env = {**prefect_env(config), "PREFECT_API_DATABASE_CONNECTION_URL":
               pg_url(config, secret, "asyncpg", config["KDSEC_PREFECT_DB"])}
        env.pop("PREFECT_API_URL")
        spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 config["KDSEC_PREFECT_PORT"]], env, "prefect")
    wait_http("prefect-server", urls(config)["prefect"] + "/health", 180)


def mlflow_env(config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    auth_config = state_dir() / "mlflow" / "auth.ini"
    return {**base_env(), "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            "MLFLOW_BACKEND_STORE_URI": pg_url(config, secret, "psycopg", config["KDSEC_MLFLOW_DB"]),
            "KDSEC_VERDICT_PUBLIC_KEY": str(signing_key()[1]),
            **{key: config[key] for key in ("KDSEC_REVIEWERS_ROLE", "KDSEC_REVIEWED_ALIASES", "KDSEC_FOUR_EYES",
                                            "KDSEC_PIPELINE_USER")}}


def mlflow_up(config: dict[str, str], secret: dict[str, str]) -> None:
    folder = state_dir() / "mlflow"
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    auth_config = folder / "auth.ini"
    descriptor = os.open(auth_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:  # no admin password here: it comes from the environment
        handle.write("[mlflow]\ndefault_permission = READ\n"
                     f"database_uri = {pg_url(config, secret, 'psycopg', config['KDSEC_MLFLOW_DB'])}\n"
                     "admin_username = admin\nauthorization_function = kdsec.mlflow_auth:authenticate\n"
                     "grant_default_workspace_access = false\n")
    if running("mlflow-server") is None:
        spawn("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                config["KDSEC_MLFLOW_PORT"], "--app-name", "basic-auth", "--artifacts-destination",
                                str(folder / "artifacts"), "--workers", "1"], mlflow_env(config, secret), "mlflow")
    wait_http("mlflow-server", urls(config)["mlflow"] + "/health", 240)


@contextlib.contextmanager
def acting_as(user: str, password: str) -> Iterator[None]:
    """MLflow client calls in this block authenticate as ``user``."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _exists(exc: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(exc, "error_code", "")) or "already exists" in str(exc)


def provision(config: dict[str, str], secret: dict[str, str], mlflow_url: str | None = None) -> None:
    """Users, the experiment, the registered model and permissions (idempotent): the pipeline
    user may run experiments and register versions; reviewers (a role) may also move aliases,
    and kdsec.mlflow_auth lets only them move ``champion``. ``mlflow_url``: the server when it is
    not this stack's loopback one (docker/compose.yaml's http://mlflow:5000)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    uri = mlflow_url or urls(config)["mlflow"]
    with acting_as("admin", secret["MLFLOW_AUTH_ADMIN_PASSWORD"]):
        auth, client = AuthServiceClient(uri), MlflowClient(uri)
        for user in users(config):
            with contextlib.suppress(MlflowException):
                auth.create_user(user, secret[password_key(user)])
        experiment = client.get_experiment_by_name(config["KDSEC_EXPERIMENT"])
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config["KDSEC_EXPERIMENT"])
        try:
            client.create_registered_model(config["KDSEC_REGISTERED_MODEL"])
        except MlflowException as exc:
            if not _exists(exc):
                raise
        grants = [("experiment", experiment_id), ("registered_model", config["KDSEC_REGISTERED_MODEL"])]
        for resource, identifier in grants:
            try:
                auth.grant_user_permission(config["KDSEC_PIPELINE_USER"], resource, identifier, "EDIT")
            except MlflowException as exc:
                if not _exists(exc):
                    raise
        role = next((r for r in auth.list_roles("default") if r.name == config["KDSEC_REVIEWERS_ROLE"]), None)
        if role is None:
            role = auth.create_role("default", config["KDSEC_REVIEWERS_ROLE"], "may move reviewed aliases (champion)")
            # MANAGE on the model: a decided version also loses its `candidate` alias (a delete).
            for (resource, identifier), permission in zip(grants, ("EDIT", "MANAGE")):
                auth.add_role_permission(role.id, resource, identifier, permission)
        for user in reviewers(config):
            if not any(r.id == role.id for r in auth.list_user_roles(user)):
                auth.assign_role(user, role.id)


def worker_env(config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    user = config["KDSEC_PIPELINE_USER"]
    return {**prefect_env(config, "prefect-worker"), "MLFLOW_TRACKING_URI": urls(config)["mlflow"],
            "KDSEC_DASK_ADDRESS": dask_address(config),  # compute.dask_address of every flow run it starts
            "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": secret[password_key(user)],
            "KDSEC_WORKDIR": str(state_dir() / "work"), "KDSEC_PROJECT_DIR": str(ROOT),
            "KDSEC_SIGNING_KEY": signing_key()[0].read_text()}


def worker_up(config: dict[str, str], secret: dict[str, str]) -> None:
    pool = config["KDSEC_WORK_POOL"]
    env = prefect_env(config)
    inspect = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", pool], capture_output=True, env=env)
    if inspect.returncode != 0:
        _run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], "work-pool create", env=env)
    if running("worker") is None:
        spawn("worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                         "--name", f"kdsec-worker-{socket.gethostname()}"], worker_env(config, secret), "worker")
    deadline = time.monotonic() + 90
    while "started!" not in (_log("worker").read_text(errors="replace") if _log("worker").is_file() else ""):
        if running("worker") is None:
            raise StackError(f"the Prefect worker exited during start-up; see {_log('worker')}: {_tail('worker')}")
        if time.monotonic() > deadline:
            raise StackError(f"the Prefect worker did not start within 90 s; see {_log('worker')}")
        time.sleep(0.5)


def write_user_files(config: dict[str, str], secret: dict[str, str]) -> None:
    """``.stack/env.sh`` (URLs and the pipeline's public key, no secrets) and ``.stack/users/<name>.env`` (0600 credentials)."""
    (state_dir() / "env.sh").write_text(f"export PREFECT_API_URL={urls(config)['prefect']}\n"
                                        f"export MLFLOW_TRACKING_URI={urls(config)['mlflow']}\n"
                                        f"export KDSEC_VERDICT_PUBLIC_KEY={signing_key()[1]}\n")
    folder = state_dir() / "users"
    folder.mkdir(mode=0o700, exist_ok=True)
    for user in users(config):
        path = folder / f"{user}.env"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"export MLFLOW_TRACKING_USERNAME={user}\n"
                         f"export MLFLOW_TRACKING_PASSWORD={secret[password_key(user)]}\n")


# --- commands ------------------------------------------------------------------------------------

PORTS = (("postgres", "KDSEC_PG_PORT"), ("prefect-server", "KDSEC_PREFECT_PORT"), ("mlflow-server", "KDSEC_MLFLOW_PORT"),
         ("he-host", "KDSEC_HE_PORT"), ("dask-scheduler", "KDSEC_DASK_PORT"))


def up() -> dict[str, str]:
    config = settings()
    for name, key in PORTS:  # every port first, before anything starts
        ours = postgres_running() if name == "postgres" else running(name) is not None
        if not ours and not port_free(int(config[key])):
            raise StackError(f"port {config[key]} ({name}) is taken by another process; free it or set {key} "
                             "to another port")
    secret = stack_secrets(config)
    started = time.monotonic()
    for label, step in (("PostgreSQL", postgres_up), ("Prefect server", prefect_up), ("MLflow server", mlflow_up),
                        ("users and permissions", provision), ("Dask cluster", dask_up), ("Prefect worker", worker_up)):
        step(config, secret)
        print(f"  {label}: up ({time.monotonic() - started:.1f} s)", flush=True)
    write_user_files(config, secret)
    from kdsec.errors import KdsecError

    try:  # once the registry has a champion; until then ``he-up`` after the first approval
        he_service.he_up(config, secret)
        print(f"  HE host: up ({time.monotonic() - started:.1f} s)", flush=True)
    except (StackError, KdsecError) as exc:  # KdsecError: e.g. a client name the token store refuses
        print(f"  HE host: not started ({exc}); after the first approval: python deployments/stack.py he-up",
              flush=True)
    return config


def down() -> list[str]:
    names = ("he-host", "worker", *dask_workers(settings()), "dask-scheduler", "mlflow-server", "prefect-server")
    stopped = [name for name in names if stop(name)]
    return stopped + (["postgres"] if postgres_down() else [])


def status() -> dict[str, str]:
    states = {name: f"running (pid {pid})" if (pid := running(name)) else "stopped"
              for name in ("prefect-server", "mlflow-server", "dask-scheduler", *dask_workers(settings()), "worker",
                           "he-host")}
    if states["he-host"] == "stopped":
        states["he-host"] = "stopped (it starts once the registry has a champion: stack.py he-up)"
    return {"postgres": "running" if postgres_running() else "stopped", **states}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "he-up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            config = up()
            where = urls(config)
            print(f"team stack up under {state_dir()}\n  Prefect UI/API: {where['prefect'][:-4]}\n"
                  f"  MLflow:         {where['mlflow']}  (users: {', '.join(users(config))}; passwords in "
                  f"{state_dir() / 'users'})\n  act as a reviewer: source {state_dir() / 'env.sh'} && "
                  f"source {state_dir() / 'users' / (reviewers(config) or ['?'])[0]}.env\n"
                  f"  Dask:           {dask_address(config)}  ({len(dask_workers(config))} workers; the worker's "
                  f"flow runs use it)\n"
                  f"  HE host:        {he_service.url(config)}  (clients: {', '.join(he_service.clients(config))}; "
                  f"tokens in {state_dir() / 'users'}/<client>.he.env)\n"
                  f"  stop with: make stack-down")
        elif args.command == "he-up":
            config = settings()
            he_service.he_up(config, stack_secrets(config))
            print(f"HE host up: {he_service.url(config)} (client tokens in {state_dir() / 'users'}/<client>.he.env)")
        elif args.command == "down":
            stopped = down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        else:
            for name, state in status().items():
                print(f"{name:15s} {state}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd))[:200]} failed with exit {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
