"""A real Dask cluster for tests: a scheduler and workers started natively on loopback, each a
process of this environment (``dask scheduler`` / ``dask worker --no-nanny``), stopped by PID.
``Recorder``: a worker plugin that keeps everything a worker was handed (each task's spec when it
runs, each value it holds), for tests that prove what never reached a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class NativeCluster:
    folder: Path
    address: str = ""
    scheduler: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # name → process

    def start_scheduler(self) -> str:
        scheduler_file = self.folder / "scheduler.json"
        self.scheduler = self._spawn("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                                   "--no-dashboard", "--scheduler-file", str(scheduler_file)])
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.1)
        self.address = json.loads(scheduler_file.read_text())["address"]
        return self.address

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = self._spawn(name, [str(BIN / "dask"), "worker", self.address, "--name", name, "--nthreads", "1",
                                     "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "6GiB",
                                     "--local-directory", str(self.folder / name)], env)
        self.workers[name] = process
        return process

    def wait_for_workers(self, count: int, timeout: float = 90.0) -> None:
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=timeout)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False", **(env or {})}
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(argv, cwd=self.folder, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one worker by its PID, as a machine that dies would go."""
        process = self.workers[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        """The workers first (a worker closing says goodbye to its scheduler, and waits for it if it
        is gone already), then the scheduler; SIGKILL for any that has not ended within 20 s."""
        for group in [list(self.workers.values()), [self.scheduler]]:
            for process in group:
                if process is not None and process.poll() is None:
                    process.terminate()
            for process in group:
                if process is None:
                    continue
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def start_cluster(folder: Path, workers: int = 2, env: dict[str, str] | None = None) -> NativeCluster:
    folder.mkdir(parents=True, exist_ok=True)
    cluster = NativeCluster(folder)
    try:
        cluster.start_scheduler()
        for index in range(workers):
            cluster.start_worker(f"worker-{index}", env)
        if workers:
            cluster.wait_for_workers(workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class Recorder(WorkerPlugin):
    """A worker plugin: the pickled spec of every task the worker runs and every value it holds
    (scattered or computed), collected by ``recorded``."""

    name = "kdsec-test-recorder"

    def setup(self, worker) -> None:
        self.worker, self.blobs = worker, []

    def transition(self, key, start, finish, **kwargs) -> None:
        import cloudpickle

        state = self.worker.state.tasks.get(key)
        if finish == "executing" and state is not None:
            self.blobs.append(cloudpickle.dumps(state.run_spec))
        if finish == "memory" and key in self.worker.data:
            self.blobs.append(cloudpickle.dumps(self.worker.data[key]))


def recorded(client) -> list[bytes]:
    """Every blob each worker's ``Recorder`` kept."""
    def blobs(dask_worker):
        return list(dask_worker.plugins[Recorder.name].blobs)

    return [blob for found in client.run(blobs).values() for blob in found]
