"""The Dask cluster at ``compute.dask_address``: connecting, checking that its workers can run
the project's tasks, and running tasks there with their shared data shipped once
(``run_tasks``: the audit's reference models, ``kdsec.audit.run``).

Reference shares, HE chunks (``kdsec.he.cluster``) and sweep members' data go through
dask.distributed directly, not through Prefect's DaskTaskRunner:
- they are steps inside one pipeline task, not tasks of their own: a task runner is chosen per
  flow, so the whole pipeline flow (its MLflow tracking, keys and the HE key holder) would have
  run on the cluster;
- Prefect pickles each task's parameters into the task (and may persist them as results); a
  ``Client.scatter(..., broadcast=True)`` ships a dataset to each worker once, and a chunk's
  ciphertexts to the one worker that evaluates it;
- the HE client encrypts chunk i + 1 while chunk i is evaluated and collects the replies as they
  come; that is plain futures, not a flow of tasks.
Sweep members are whole Prefect tasks (their states belong in Prefect's UI): they keep the
DaskTaskRunner, pointed at the same scheduler (``flows.sweep``), their data scattered likewise.

Workers need no shared storage: tasks get their inputs as scattered data and return bytes
(checkpoints, ciphertexts) that this process writes. A dead worker's tasks run again elsewhere
(the scheduler reassigns them; scattered data is on every worker, ``broadcast``; ``run_tasks``
sends again what was cancelled with it). An HE chunk keeps state on its one worker: the client
sends the whole chunk again to another (``kdsec.he.cluster``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from kdsec import compute_probe
from kdsec.errors import KdsecError

logger = logging.getLogger("kdsec")


class ComputeError(KdsecError):
    """The Dask cluster cannot be reached, has no workers, or its workers cannot run our tasks."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


@contextmanager
def cluster(address: str, timeout: float = 10.0) -> Iterator:
    """A ``distributed.Client`` on the scheduler at ``address`` with at least one worker, closed
    after the block; a one-line ``ComputeError`` when none answers within ``timeout`` seconds."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise ComputeError(f"compute.dask_address '{address}': no Dask scheduler answered within {timeout:g} s "
                           f"({_first_line(error)}); start one (`dask scheduler`) or set compute.dask_address=''"
                           ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ComputeError(f"the Dask scheduler at '{address}' has no workers (waited {timeout:g} s); start "
                               f"some with `dask worker {address}`") from None
        yield client
    finally:
        client.close()


def check_workers(client, address: str) -> dict[str, dict[str, str | None]]:
    """Every worker runs the Python, the package versions and the project code this process
    does, or a one-line ``ComputeError`` naming the worker and what it lacks. Returns each
    worker's environment."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(compute_probe)  # it must answer where kdsec is missing
    try:
        found = client.run(compute_probe.environment, on_error="return")
    finally:
        cloudpickle.unregister_pickle_by_value(compute_probe)
    ours = compute_probe.environment()
    for worker, theirs in sorted(found.items()):
        if isinstance(theirs, BaseException):
            raise ComputeError(f"Dask worker {worker} at '{address}' could not report its packages: "
                               f"{_first_line(theirs)}")
        compare_environments(worker, theirs, ours, address)
    return found


def compare_environments(worker: str, theirs: dict, ours: dict, address: str) -> None:
    """A one-line ``ComputeError`` for the first package (or project code) ``worker`` lacks or
    has in another version than this machine."""
    for name, version in ours.items():
        if theirs.get(name) == version:
            continue
        if theirs.get(name) is None:
            raise ComputeError(f"Dask worker {worker} at '{address}' lacks {name} (this machine has "
                               f"{version}); install the project's locked environment there (uv sync --frozen)")
        what = "code" if name in compute_probe.PROJECT else "version"
        raise ComputeError(f"Dask worker {worker} at '{address}' has {name} {what} {theirs[name]} where this "
                           f"machine has {version}; run the same commit and locked environment on every worker")


def preflight_cluster(address: str, timeout: float) -> None:
    """Before any training: the scheduler answers, has a worker, and its workers match us."""
    with cluster(address, timeout) as client:
        check_workers(client, address)


def worker_threads(client) -> int:
    """Tasks the cluster runs at once (its workers' threads)."""
    return max(1, sum(client.nthreads().values()))


def first_done(futures, stop=None) -> list:
    """Block until one of the Dask ``futures`` is done (finished, failed or cancelled); the done
    ones. (``distributed.wait`` needs a default client; ours are never the default.) ``stop``:
    asked each second while none is done; the futures it returns (not done: e.g. their worker
    left) are returned instead."""
    import threading

    ready = threading.Event()
    for future in futures:
        future.add_done_callback(lambda _: ready.set())
    while not (done := [future for future in futures if future.done()]):
        if stop is not None and (stopped := stop()):
            return stopped
        ready.wait(1.0)
    return done


def task_key(*parts: object) -> str:
    """A readable, unique task key: ``kdsec-<kind>-...-<random>`` (the scheduler groups by its prefix)."""
    import uuid

    return "-".join(["kdsec", *(str(part) for part in parts), uuid.uuid4().hex[:12]])


# --- tasks with shared data, sent again when a worker dies -----------------------------------------

ATTEMPTS = 3  # a task whose worker died (or whose scattered data died with one) is sent this many times at most


def run_tasks(address: str, timeout: float, function, shared: object, jobs: list[tuple[str, tuple]],
              step=None) -> list:
    """``function(shared, *args)`` for each ``(label, args)`` of ``jobs``, as tasks on the cluster
    at ``address`` (keys ``kdsec-<label>-…``), ``shared`` scattered to every worker once. A task
    the scheduler could not finish (its worker died, and maybe the scattered data with it) is
    sent again, ``shared`` scattered again where it was lost, up to ``ATTEMPTS`` times; an error
    the task itself raised is raised here. Results in the order of ``jobs``."""
    results: list = [None] * len(jobs)
    with cluster(address, timeout) as client:
        data = client.scatter([shared], broadcast=True, hash=False)[0]

        def send(index: int):
            label, args = jobs[index]
            return client.submit(function, data, *args, key=task_key(label), pure=False)

        pending = {send(index): (index, 0) for index in range(len(jobs))}
        if step:
            step(f"{len(jobs)} tasks on {worker_threads(client)} Dask worker threads at {address}")
        while pending:
            for future in first_done(list(pending)):
                index, attempt = pending.pop(future)
                try:
                    results[index] = future.result()
                except KdsecError:
                    raise
                except Exception as error:  # its worker died, or its data was lost with one
                    label = jobs[index][0]
                    if attempt + 1 >= ATTEMPTS or not lost(future):
                        raise ComputeError(f"task {label} failed on the Dask cluster at '{address}' (attempt "
                                           f"{attempt + 1}): {type(error).__name__}: {_first_line(error)}") from None
                    logger.warning("Dask task %s: %s; sent again", label, _first_line(error))
                    if data.status != "finished":
                        data = client.scatter([shared], broadcast=True, hash=False)[0]
                    pending[send(index)] = (index, attempt + 1)
    return results


def lost(future) -> bool:
    """Whether a failed future failed for the cluster's sake (its worker died: the scheduler
    cancelled it), not because its function raised (KilledWorker, a task that took down a
    worker three times, e.g. out of memory, is not sent a fourth)."""
    return future.status == "cancelled"
