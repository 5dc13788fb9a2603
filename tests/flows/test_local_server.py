"""The local Prefect server `make run` reuses: started once in the background, found again by the
next run, stopped by pid (and only if it is still that server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flows import local_server

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = f"/proc/{pid}/stat"
    return not (os.path.exists(stat) and open(stat).read().split(") ", 1)[-1].startswith("Z"))


def test_started_once_reused_then_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = local_server.ensure()
    state = json.loads((tmp_path / "home" / "kdsec-server.json").read_text())
    try:
        assert url == f"http://127.0.0.1:{state['port']}/api" == os.environ["PREFECT_API_URL"]
        assert local_server.running() == state
        # A second run (another process) attaches to the same server instead of starting one.
        again = subprocess.run([sys.executable, "-m", "flows.local_server", "start"], capture_output=True,
                               text=True, env={**os.environ, "PREFECT_HOME": str(tmp_path / "home")}, timeout=120)
        assert again.returncode == 0 and f"127.0.0.1:{state['port']}/api" in again.stdout
        assert json.loads((tmp_path / "home" / "kdsec-server.json").read_text())["pid"] == state["pid"]
    finally:
        message = local_server.stop()
    assert f"pid {state['pid']}" in message
    deadline = time.monotonic() + 20
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(state["pid"])
    assert local_server.running() is None
    assert local_server.stop() == "no local Prefect server is running"


def test_a_recorded_pid_that_is_not_a_prefect_server_is_never_signalled(tmp_path, monkeypatch):
    """A stale state file naming a pid now used by another program: stop() leaves it alone."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "kdsec-server.json").write_text(json.dumps({"pid": bystander.pid, "port": 1}))
        assert local_server.running() is None
        assert local_server.stop() == "no local Prefect server is running"
        assert bystander.poll() is None
        assert not (tmp_path / "kdsec-server.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_bad_config_fails_before_any_server_starts(tmp_path):
    """`make run` with a bad --set: one line on stderr, exit 1, and no server was started."""
    home = tmp_path / "home"
    result = subprocess.run([sys.executable, "-m", "kdsec.cli", "run", "--set", "compress.sparsity=2"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PREFECT_HOME": str(home), "KDSEC_LOCAL_SERVER": "1"})
    assert result.returncode == 1
    assert "compress.sparsity" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (home / "kdsec-server.json").exists()
