"""A persistent local Prefect server that ``make run`` starts once and later runs attach to.

Without ``PREFECT_API_URL`` every ``kdsec run`` would start Prefect's temporary server (tens of
seconds on 2 cores, and its run history vanishes with it). With ``KDSEC_LOCAL_SERVER=1`` (what
``make run`` sets) the first run starts ``prefect server start`` in the background on loopback,
records its pid and port in ``$PREFECT_HOME/kdsec-server.json``, and every later run finds it
healthy and points ``PREFECT_API_URL`` at it — and the runs stay visible in its UI. Stop it with
``make prefect-stop`` (only the process this file recorded, and only if it is still that server).

This module must not import Prefect: it runs before Prefect reads its settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STATE = "kdsec-server.json"
STARTUP_SECONDS = 180  # a first start migrates the database; slow on a busy 2-core machine


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE


def _read_state() -> dict | None:
    path = _state_path()
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(descriptor) as handle:
        try:
            state = json.loads(handle.read(4096))
        except ValueError:
            return None
    if not (isinstance(state, dict) and isinstance(state.get("pid"), int) and isinstance(state.get("port"), int)):
        return None
    return state


def _healthy(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _is_our_server(pid: int) -> bool:
    """The recorded pid still runs ``prefect server start`` (not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"server" in command and any(part.endswith(b"prefect") for part in command)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running() -> dict | None:
    """The recorded server, if it is alive and answers."""
    state = _read_state()
    if state and _is_our_server(state["pid"]) and _healthy(state["port"]):
        return state
    return None


def ensure() -> str:
    """The API URL of the local server, started now (in the background) if none answers. Sets
    ``PREFECT_API_URL`` for this process. Two runs at once start one server (file lock)."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(home / "kdsec-server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        state = running() or _start(home)
    finally:
        os.close(descriptor)
    url = f"http://127.0.0.1:{state['port']}/api"
    os.environ["PREFECT_API_URL"] = url
    return url


def _start(home: Path) -> dict:
    port = _free_port()
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]
    log = os.open(home / "kdsec-server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                   start_new_session=True, close_fds=True)  # outlives this run
    finally:
        os.close(log)
    state = {"pid": process.pid, "port": port, "started": time.time()}
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _healthy(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the local Prefect server did not start; see {home / 'kdsec-server.log'}")
        time.sleep(0.5)
    _write_state(home, state)
    return state


def _write_state(home: Path, state: dict) -> None:
    temporary = home / f".{STATE}.{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(state, handle)
    os.replace(temporary, home / STATE)


def stop() -> str:
    """Stop the recorded server (its whole process group) if it is still ours."""
    state = _read_state()
    if not state or not _is_our_server(state["pid"]):
        _state_path().unlink(missing_ok=True)
        return "no local Prefect server is running"
    os.killpg(state["pid"], signal.SIGTERM)
    for _ in range(40):
        if not _is_our_server(state["pid"]):
            break
        time.sleep(0.25)
    else:
        os.killpg(state["pid"], signal.SIGKILL)
    _state_path().unlink(missing_ok=True)
    return f"stopped the local Prefect server (pid {state['pid']}, port {state['port']})"


def main(argv: list[str]) -> int:
    action = argv[0] if argv else "status"
    if action == "start":
        print(f"local Prefect server: {ensure()} (UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')})")
    elif action == "stop":
        print(stop())
    elif action == "status":
        state = running()
        print(f"local Prefect server: http://127.0.0.1:{state['port']} (pid {state['pid']})" if state
              else "no local Prefect server is running (make run starts one)")
    else:
        print(f"usage: python -m flows.local_server start|stop|status (not '{action}')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
