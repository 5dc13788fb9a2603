"""Encrypted input, batched path, with the Dask cluster at ``compute.dask_address`` as the host:
each chunk's ciphertexts are evaluated by a task on a worker (``kdsec.compute`` says why Dask
directly). The key holder stays in this process: it encrypts, it decrypts. A worker receives
the public context and the model once (scattered to every worker), then one chunk's feature
ciphertexts (scattered to the worker that evaluates them), and returns the output ciphertexts'
bytes: no secret key, no plaintext input ever reaches it. At most as many chunks are in flight
as the cluster runs tasks at once, and the client encrypts the next chunk while they run. A
chunk whose worker died (its ciphertexts went with it) is sent again, up to ``ATTEMPTS`` times.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

import numpy as np

from kdsec.compute import ATTEMPTS, ComputeError, cluster, first_done, lost, task_key, worker_threads
from kdsec.errors import KdsecError
from kdsec.he.batched import GROUPS, BatchedServer
from kdsec.he.ops import Op
from kdsec.he.seal import KeyHolder, PublicContext

_SERVERS: OrderedDict[str, BatchedServer] = OrderedDict()  # on a worker: context digest → its host, 2 at most
_SERVERS_LOCK = threading.Lock()


def evaluate_chunk(digest: str, context_bytes: bytes, ops: list[Op], payloads: list[bytes]) -> tuple[bytes, float]:
    """On a worker: one chunk (its features in ``payloads``, ciphertext bundles) through the
    model, under the public context ``context_bytes`` (loaded once per worker process, keyed by
    ``digest``). Returns the output ciphertexts' bytes and the seconds spent."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with _SERVERS_LOCK:
        server = _SERVERS.get(digest)
        if server is None:
            if hashlib.sha256(context_bytes).hexdigest() != digest:
                raise KdsecError("the public context a worker received does not match its digest")
            server = BatchedServer(PublicContext.deserialize(context_bytes), ops)
            _SERVERS[digest] = server
            while len(_SERVERS) > 2:
                _SERVERS.popitem(last=False)
        _SERVERS.move_to_end(digest)
    with threadpool_limits(1):  # one core per task, as a host process runs
        stream = server.stream()
        for payload in payloads:
            stream.feed(server.public.load_ciphertexts(payload))
        reply = server.public.dump_ciphertexts(stream.finish())
    return reply, time.perf_counter() - started


def cluster_hosts(holder: KeyHolder, context_bytes: bytes, ops: list[Op], required: list[int], inputs: np.ndarray,
                  chunks: list[slice], address: str, timeout: float, advance) -> list:
    """The batched round trip with the cluster's workers as hosts; per chunk (logits, host
    seconds, bytes sent, bytes received), in chunk order."""
    digest = hashlib.sha256(context_bytes).hexdigest()
    groups = [group for group in np.array_split(np.asarray(required), min(GROUPS, len(required))) if len(group)]
    results: list = [None] * len(chunks)
    with cluster(address, timeout) as client:
        width = worker_threads(client)
        shared = client.scatter([context_bytes, ops], broadcast=True, hash=False)
        pending: dict = {}  # future → (chunk index, payloads, attempt, worker)

        def send(index: int, payloads: list[bytes], attempt: int) -> None:
            # the worker with the fewest of our chunks per thread: its ciphertexts go there alone
            threads = client.nthreads()
            load = {worker: 0 for worker in threads}
            for *_, worker in pending.values():
                load[worker] = load.get(worker, 0) + 1
            target = min(sorted(threads), key=lambda worker: load[worker] / threads[worker])
            data = client.scatter([payloads], workers=[target], hash=False)[0]
            future = client.submit(evaluate_chunk, digest, *shared, data, key=task_key("he-chunk", index),
                                   pure=False, workers=[target], allow_other_workers=True)
            pending[future] = (index, payloads, attempt, target)

        def collect(block: bool) -> None:
            finished = first_done(list(pending)) if block else [future for future in pending if future.done()]
            for future in finished:
                index, payloads, attempt, _ = pending.pop(future)
                try:
                    reply, seconds = future.result()
                except KdsecError:
                    raise
                except Exception as error:  # its worker died, or its ciphertexts were lost with one
                    if attempt + 1 >= ATTEMPTS or not lost(future):  # as run_tasks: a raised error is not retried
                        raise ComputeError(f"HE chunk {index} failed {ATTEMPTS} times on the Dask cluster at "
                                           f"'{address}': {type(error).__name__}: {str(error)[:200]}") from None
                    send(index, payloads, attempt + 1)
                    continue
                outputs = holder.public.load_ciphertexts(reply)
                count = chunks[index].stop - chunks[index].start
                results[index] = (np.stack([holder.decrypt(ct)[:count] for ct in outputs], axis=1), seconds,
                                  sum(map(len, payloads)), len(reply))
                advance(f"{chunks[index].stop}/{len(inputs)} samples (Dask)")

        for index, chunk in enumerate(chunks):
            features = inputs[chunk].reshape(chunk.stop - chunk.start, -1).astype(np.float64)
            payloads = [holder.encrypt_bundle([features[:, i] for i in group]) for group in groups]
            collect(block=False)
            while len(pending) >= width:
                collect(block=True)
            send(index, payloads, 0)
        while pending:
            collect(block=True)
    return results
