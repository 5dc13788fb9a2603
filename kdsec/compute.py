"""The Dask cluster at ``compute.dask_address``: connecting, checking that its workers can run
the project's tasks, shipping data once, and the audit's reference models as tasks there.

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
(the scheduler reassigns them; scattered data is on every worker, ``broadcast``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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


def first_done(futures) -> list:
    """Block until one of the Dask ``futures`` is done (finished, failed or cancelled); the done
    ones. (``distributed.wait`` needs a default client; ours are never the default.)"""
    import threading

    ready = threading.Event()
    for future in futures:
        future.add_done_callback(lambda _: ready.set())
    while not (done := [future for future in futures if future.done()]):
        ready.wait(1.0)
    return done


def task_key(*parts: object) -> str:
    """A readable, unique task key: ``kdsec-<kind>-...-<random>`` (the scheduler groups by its prefix)."""
    import uuid

    return "-".join(["kdsec", *(str(part) for part in parts), uuid.uuid4().hex[:12]])


# --- the audit's reference models ----------------------------------------------------------------


def train_reference_share(spec, train, population, masks: np.ndarray, seeds: list[int]) -> list[bytes]:
    """On a worker: reference models ``seeds`` (``masks``: the population half of each), trained
    as this process would (``train_references``, one torch thread per task, as a local share on
    2 cores trains), returned as safetensors bytes; nothing is written on the worker but a
    temporary folder."""
    from kdsec.audit.reference import train_references
    from kdsec.device import torch_threads

    x_population, y_population = population
    with tempfile.TemporaryDirectory(prefix="kdsec-reference-") as folder, torch_threads(1):
        paths = [Path(folder) / f"{seed}.safetensors" for seed in seeds]
        train_references(spec, train, x_population, y_population, masks, list(seeds), paths)
        return [path.read_bytes() for path in paths]


ATTEMPTS = 3  # a unit whose worker died (or whose scattered data died with one) is sent this many times at most


def train_references_on_cluster(address: str, timeout: float, units: list[tuple[str, object, object, list[int]]],
                                x_population: np.ndarray, y_population: np.ndarray, masks: np.ndarray, seed: int,
                                step=None) -> dict[tuple[str, int], bytes]:
    """Each of ``units`` (group, spec, train, indices: ``reference_units``, one model or one block
    that trains together) as one task on the cluster, the population scattered to every worker
    once. A task the scheduler could not finish (its worker died, and the scattered population
    with it) is sent again, the population scattered again, up to ``ATTEMPTS`` times. Returns
    each (group, index)'s checkpoint bytes."""
    done: dict[tuple[str, int], bytes] = {}
    with cluster(address, timeout) as client:
        population = client.scatter([(x_population, y_population)], broadcast=True, hash=False)[0]

        def send(group, spec, train, unit):
            return client.submit(train_reference_share, spec, train, population, masks[unit],
                                 [seed * 1000 + index for index in unit], key=task_key("reference", group), pure=False)

        pending = {send(*unit): (unit, 0) for unit in units}
        if step:
            step(f"reference models: {len(pending)} tasks on {worker_threads(client)} Dask worker threads at {address}")
        while pending:
            for future in first_done(list(pending)):
                (group, spec, train, unit), attempt = pending.pop(future)
                try:
                    blobs = future.result()
                except KdsecError:
                    raise
                except Exception as error:  # its worker died, or the population was lost with one
                    if attempt + 1 >= ATTEMPTS:
                        raise ComputeError(f"reference models ({group}) failed {ATTEMPTS} times on the Dask cluster "
                                           f"at '{address}': {type(error).__name__}: {_first_line(error)}") from None
                    logger.warning("reference models (%s) %s: %s; sent again", group, unit, _first_line(error))
                    if population.status != "finished":
                        population = client.scatter([(x_population, y_population)], broadcast=True, hash=False)[0]
                    pending[send(group, spec, train, unit)] = ((group, spec, train, unit), attempt + 1)
                    continue
                done.update({(group, index): blob for index, blob in zip(unit, blobs, strict=True)})
    return done
