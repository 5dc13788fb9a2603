"""Encrypted input, batched path, with the Dask cluster at ``compute.dask_address`` as the host
(``kdsec.compute`` says why Dask directly). The key holder stays in this process: it encrypts,
it decrypts. A worker receives the public context and the model once (scattered to every
worker), then one chunk's feature ciphertexts and returns the output ciphertexts' bytes: no
secret key, no plaintext input ever reaches it.

A chunk travels as a *stream*, as it does to a host process here (``batched.GROUPS``): each group
of its features is scattered straight to the chunk's worker (``direct``: not through the
scheduler, 77 MB a group on MNIST) as soon as it is encrypted, and fed by a task that adds its
first-layer products to the chunk's state on that worker (``feed_group``); a last task
(``finish_stream``) evaluates the rest. The worker computes while the client encrypts the next
group, the tasks of a chunk run in order (each depends on the one before) and on one worker
(the state lives there). Chunks go to the least loaded worker; one more chunk than the cluster
has threads is in flight, so the client encrypts while every worker is busy.

A chunk whose worker died (its ciphertexts and state went with it), or takes no data (paused,
closing, unreachable), is sent again whole to another, up to ``ATTEMPTS`` times; an error a task
raised is the run's. A chunk's state on a worker is dropped by its finish; what a run cut short
left there, at the run's end (``drop_streams``, failed runs included), or after ``IDLE_SECONDS``
unfed where the client vanished.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from kdsec.compute import ATTEMPTS, ComputeError, cluster, first_done, lost, task_key, worker_threads
from kdsec.errors import KdsecError
from kdsec.he.batched import BatchedServer, BatchedStream, feature_groups
from kdsec.he.ops import Op
from kdsec.he.seal import KeyHolder, PublicContext

logger = logging.getLogger("kdsec")

# on a worker: context digest → its host (2 at most); stream key → (a chunk's state, when last fed)
_SERVERS: OrderedDict[str, BatchedServer] = OrderedDict()
_STREAMS: dict[str, tuple[BatchedStream, float]] = {}
_ENDED: deque[str] = deque(maxlen=256)  # the runs that ended (``drop_streams``), newest last
_LOCK = threading.Lock()
# A chunk's state is dropped by its finish, by its run's end (``drop_streams``, also when the run
# fails) or, where its client vanished without either, once nothing has fed it for this long.
IDLE_SECONDS = 600.0


class StreamLost(ComputeError):
    """A chunk's group reached a worker without the chunk's state (it ran elsewhere): send the chunk again."""


def _server(digest: str, context_bytes: bytes, ops: list[Op]) -> BatchedServer:
    with _LOCK:
        server = _SERVERS.get(digest)
        if server is None:
            if hashlib.sha256(context_bytes).hexdigest() != digest:
                raise KdsecError("the public context a worker received does not match its digest")
            server = BatchedServer(PublicContext.deserialize(context_bytes), ops)
            _SERVERS[digest] = server
            while len(_SERVERS) > 2:
                _SERVERS.popitem(last=False)
        _SERVERS.move_to_end(digest)
        return server


def feed_group(digest: str, context_bytes: bytes, ops: list[Op], run: str, stream_key: str, position: int,
               payload: bytes, before: float = 0.0) -> float:
    """On a worker: the chunk ``stream_key``'s group ``position`` (a ciphertext bundle) into its
    state, begun at position 0; ``run``: the run's stem (a run that ended begins nothing).
    ``before``: the seconds its earlier groups took (the result of the task before, which
    orders them). Returns the seconds so far."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    server = _server(digest, context_bytes, ops)
    now = time.monotonic()
    with _LOCK:
        if run in _ENDED:
            raise StreamLost(f"HE run {run} has ended")
        if position == 0:
            for key in [key for key, (_, fed) in _STREAMS.items() if now - fed > IDLE_SECONDS]:
                del _STREAMS[key]
            stream = server.stream()
        elif (found := _STREAMS.get(stream_key)) is None:
            raise StreamLost(f"HE chunk state {stream_key} is not on this worker")
        else:
            stream = found[0]
        _STREAMS[stream_key] = (stream, now)
    with threadpool_limits(1):  # one core per task, as a host process runs
        stream.feed(server.public.load_ciphertexts(payload))
    return before + time.perf_counter() - started


def finish_stream(digest: str, context_bytes: bytes, ops: list[Op], stream_key: str,
                  before: float) -> tuple[bytes, float]:
    """On a worker: the rest of the model on the chunk ``stream_key``, its state dropped. Returns
    the output ciphertexts' bytes and the seconds the chunk took here."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    server = _server(digest, context_bytes, ops)
    with _LOCK:
        found = _STREAMS.pop(stream_key, None)
    if found is None:
        raise StreamLost(f"HE chunk state {stream_key} is not on this worker")
    with threadpool_limits(1):
        reply = server.public.dump_ciphertexts(found[0].finish())
    return reply, before + time.perf_counter() - started


def drop_streams(run: str) -> int:
    """On a worker (``Client.run``), at the end of the run ``run``: drop the chunk states it
    left (their keys start with it) and begin no more of its chunks (a group task of it may still
    be queued or running). How many there were."""
    with _LOCK:
        _ENDED.append(run)
        keys = [key for key in _STREAMS if key.startswith(f"{run}-")]
        for key in keys:
            del _STREAMS[key]
    return len(keys)


class _Gone(Exception):
    """The worker a chunk was sent to left the cluster, or takes no data now (paused, closing,
    unreachable): this attempt cannot use it."""

    def __init__(self, worker: str, why: str = "left the cluster") -> None:
        super().__init__(f"Dask worker {worker} {why}")
        self.worker = worker


class _Chunk:
    """A chunk on its way: its groups' bytes so far (kept until its reply, to send again) and its
    attempt: the worker, the task keys' stem, the groups fed there, its last task."""

    def __init__(self, index: int) -> None:
        self.index, self.payloads, self.attempt = index, [], -1
        self.target, self.key, self.fed, self.last = "", "", 0, None


def cluster_hosts(holder: KeyHolder, context_bytes: bytes, ops: list[Op], required: list[int], inputs: np.ndarray,
                  chunks: list[slice], address: str, timeout: float, advance) -> list:
    """The batched round trip with the cluster's workers as hosts; per chunk (logits, host
    seconds, bytes sent, bytes received), in chunk order."""
    digest = hashlib.sha256(context_bytes).hexdigest()
    groups = feature_groups(required)
    run = task_key("he-chunk")  # the stem of this run's task keys and chunk states
    with cluster(address, timeout) as client:
        try:
            return _stream_chunks(client, run, digest, holder, context_bytes, ops, groups, inputs, chunks, address,
                                  advance)
        finally:  # what a chunk cut short left on a worker (a finished one left nothing)
            try:
                client.run(drop_streams, run, on_error="ignore")
            except Exception as error:  # the cluster went away: its workers' memory with it
                logger.debug("HE chunks: could not drop chunk states: %s", error)


def _stream_chunks(client, run: str, digest: str, holder: KeyHolder, context_bytes: bytes, ops: list[Op],
                   groups: list, inputs: np.ndarray, chunks: list[slice], address: str, advance) -> list:
    """``cluster_hosts``' work on a connected ``client``; this run's keys begin with ``run``."""
    results: list = [None] * len(chunks)
    width = worker_threads(client)
    shared = client.scatter([context_bytes, ops], broadcast=True, hash=False)
    pending: dict = {}  # a chunk's last task → the chunk
    wave: list[_Chunk] = []  # the chunks being encrypted and sent, not yet pending
    direct = [True]  # scatter straight to the worker; through the scheduler if this client cannot reach it

    def restart(chunk: _Chunk, why: str = "", avoid: str = "") -> None:
        """A new attempt for ``chunk`` on the worker with the fewest of our chunks per thread
        (not ``avoid``, the one that just failed it, while there is another)."""
        if why:
            if chunk.attempt + 1 >= ATTEMPTS:
                raise ComputeError(f"HE chunk {chunk.index} failed {ATTEMPTS} times on the Dask cluster at "
                                   f"'{address}': {why[:200]}")
            logger.warning("HE chunk %d: %s; sent again", chunk.index, why[:200])
        threads = client.nthreads()
        if not threads:
            raise ComputeError(f"HE chunk {chunk.index}: no Dask workers left at '{address}'")
        load = dict.fromkeys(threads, 0)
        for other in [*pending.values(), *(other for other in wave if other is not chunk and other.target)]:
            load[other.target] = load.get(other.target, 0) + 1
        candidates = sorted(threads.keys() - {avoid}) or sorted(threads)
        chunk.target = min(candidates, key=lambda worker: load[worker] / threads[worker])
        chunk.attempt, chunk.fed, chunk.last = chunk.attempt + 1, 0, None
        chunk.key = f"{run}-{chunk.index}-attempt-{chunk.attempt}"

    def scatter(chunk: _Chunk, payload: bytes):
        """``payload`` onto the chunk's worker: straight (``direct``), else through the scheduler
        (from then on, if that is how this client reaches it); ``_Gone`` where neither can."""
        if chunk.target not in client.nthreads():
            raise _Gone(chunk.target)
        if direct[0]:
            try:
                return client.scatter([payload], workers=[chunk.target], direct=True, hash=False)[0]
            except Exception:  # noqa: BLE001 - unreachable from here, paused, closing or gone: try the other way
                if chunk.target not in client.nthreads():
                    raise _Gone(chunk.target) from None
        try:
            data = client.scatter([payload], workers=[chunk.target], hash=False)[0]
        except Exception as error:  # noqa: BLE001 - the scheduler cannot place it there either
            raise _Gone(chunk.target, f"took no data ({type(error).__name__})") from None
        if direct[0]:
            direct[0] = False
            logger.warning("HE chunks: this client cannot send to Dask worker %s directly; sending through the "
                           "scheduler", chunk.target)
        return data

    def push(chunk: _Chunk, done: bool = False) -> None:
        """The chunk's groups not yet on its worker, in order (each task waits for the one
        before), then, once ``done``, its finishing task; elsewhere if its worker left."""
        while True:
            try:
                while chunk.fed < len(chunk.payloads):
                    data = scatter(chunk, chunk.payloads[chunk.fed])
                    chunk.last = client.submit(feed_group, digest, *shared, run, chunk.key, chunk.fed, data,
                                               chunk.last if chunk.last is not None else 0.0,
                                               key=f"{chunk.key}-group-{chunk.fed}", pure=False,
                                               workers=[chunk.target], allow_other_workers=False)
                    chunk.fed += 1
                if done:
                    chunk.last = client.submit(finish_stream, digest, *shared, chunk.key, chunk.last,
                                               key=f"{chunk.key}-finish", pure=False, workers=[chunk.target],
                                               allow_other_workers=False)
                    pending[chunk.last] = chunk
                return
            except _Gone as error:
                restart(chunk, str(error), avoid=error.worker)

    def gone() -> list:
        """The pending chunks whose worker is no longer in the cluster."""
        present = client.nthreads()
        return [future for future, chunk in pending.items() if chunk.target not in present]

    def collect(block: bool) -> None:
        finished = first_done(list(pending), stop=gone) if block else [f for f in pending if f.done()]
        for future in finished:
            chunk = pending.pop(future)
            try:
                if not future.done():  # its worker left the cluster: its tasks would wait for it forever
                    client.cancel([future])
                    raise _Gone(chunk.target)
                reply, seconds = future.result()
            except (_Gone, StreamLost) as error:
                restart(chunk, str(error), avoid=chunk.target)
                push(chunk, done=True)
                continue
            except KdsecError:
                raise
            except Exception as error:  # its worker died, or its ciphertexts were lost with one
                if not lost(future):  # as run_tasks: an error the task raised is not sent again
                    raise ComputeError(f"HE chunk {chunk.index} failed on the Dask cluster at '{address}': "
                                       f"{type(error).__name__}: {str(error)[:200]}") from None
                restart(chunk, f"{type(error).__name__}: {error}", avoid=chunk.target)
                push(chunk, done=True)
                continue
            outputs = holder.public.load_ciphertexts(reply)
            count = chunks[chunk.index].stop - chunks[chunk.index].start
            results[chunk.index] = (np.stack([holder.decrypt(ct)[:count] for ct in outputs], axis=1), seconds,
                                    sum(map(len, chunk.payloads)), len(reply))
            advance(f"{chunks[chunk.index].stop}/{len(inputs)} samples (Dask)")

    following = 0
    while following < len(chunks):
        collect(block=False)
        while len(pending) > width:  # every worker busy and one chunk queued: wait
            collect(block=True)
        # as many chunks as workers are idle (one if none: it queues), their groups encrypted in
        # turn, so each of their workers starts on its first group while the client encrypts
        size = min(len(chunks) - following, max(1, width - len(pending)))
        wave[:] = [_Chunk(index) for index in range(following, following + size)]
        following += len(wave)
        for chunk in wave:
            restart(chunk)
        features = [inputs[chunks[chunk.index]].reshape(-1, inputs[0].size).astype(np.float64) for chunk in wave]
        for group in groups:
            for chunk, values in zip(wave, features, strict=True):
                chunk.payloads.append(holder.encrypt_bundle([values[:, i] for i in group]))
                push(chunk)
        for chunk in wave:
            push(chunk, done=True)
        wave.clear()
    while pending:
        collect(block=True)
    return results
