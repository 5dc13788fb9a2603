"""Encrypted input, batched path: the host (``BatchedServer``) evaluates one ciphertext per input
feature, its slots holding that feature for up to N/2 samples (CryptoNets); and the host
processes that evaluate several chunks at once while the client encrypts the next
(``_parallel_hosts``). On the *paired* chain (students that alternate Linear and x²;
``HEParams.weight_scale_bits``) each Linear is one exact residue-domain matrix product
(``residue.ResidueLinear``), its weights integers at 2^w, rescaled only after an x² (one prime
per x²). On the *classic* chain a Linear is a weighted sum of ciphertexts with plaintext scalars,
rescaled once per neuron — but the last, whose weights are encoded at 2^last_scale_bits and whose
sums stay in the 60-bit decryption prime where the parameters say so. Zero (pruned) weights, and
neurons nothing downstream reads, are skipped. No rotations. The round trip is
``encrypted_input.run_encrypted_input``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from kdsec.config import HEConfig
from kdsec.crypto.he.program import LinearOp, Op, SquareOp, alternates, batched_params, model_structure
from kdsec.crypto.he.residue import LayoutError, ResidueLinear
from kdsec.crypto.seal import KeyHolder, PublicContext
from kdsec.errors import KdsecError

# --- encrypted input, batched ----------------------------------------------------------------


def _live_inputs(ops: list[Op]) -> list[np.ndarray]:
    """For each op, which of its input values anything downstream reads (backward liveness)."""
    needed = np.ones(len(ops[-1].bias), dtype=bool)
    live: list[np.ndarray] = []
    for op in reversed(ops):
        if isinstance(op, LinearOp):
            needed = (op.weight[needed] != 0).any(axis=0)
        live.append(needed)
    return live[::-1]


class BatchedServer:
    """Encrypted-input host, batched path: plaintext model, public context, no secret key.

    Two chains (``HEParams.weight_scale_bits`` says which the client planned). *Paired*: each
    Linear is one residue-domain matrix product (``ResidueLinear``), its weights at 2^w; x² is
    not rescaled, the Linear after it is, once. *Classic*: each neuron a weighted sum of SEAL
    products, rescaled once, the last Linear unrescaled where ``last_scale_bits`` says so.
    ``residue_layers``: a cache of the residue layers to share between servers of one model (an
    HTTP host's sessions), keyed by op, column pattern and weight scale."""

    def __init__(self, public: PublicContext, ops: list[Op], residue_layers: dict | None = None) -> None:
        self.public, self.ops, self.live = public, ops, _live_inputs(ops)
        self.paired = public.params.weight_scale_bits is not None
        if self.paired and not alternates(model_structure(ops)):
            raise KdsecError("a paired chain needs a program that alternates Linear and x²; this one does not")
        self._residue = {} if residue_layers is None else residue_layers

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops)

    @staticmethod
    def params(ops: list[Op], config: HEConfig):
        """The batched path's parameters (``batched_params``): paired where the program alternates."""
        return batched_params(model_structure(ops), config)

    @staticmethod
    def required_inputs(ops: list[Op]) -> list[int]:
        """Input features some kept weight reads; the client encrypts and sends only these (this
        tells the client which features a pruned model ignores, nothing about the weights)."""
        return np.flatnonzero(_live_inputs(ops)[0]).tolist()

    def infer(self, features: list) -> list:
        """``features``: one ciphertext per required input (``required_inputs``); on the paired
        chain they are consumed (their memory becomes the first layer's outputs). A value is a
        ciphertext, a plain constant the host already knows (every weight feeding it was pruned),
        or None (nothing downstream reads it)."""
        values: list = [None] * self.ops[0].weight.shape[1]
        required = np.flatnonzero(self.live[0])
        if len(features) != len(required):
            raise KdsecError(f"expected {len(required)} encrypted input features, got {len(features)}")
        for index, ciphertext in zip(required, features):
            values[index] = ciphertext
        for index, op in enumerate(self.ops):
            if isinstance(op, SquareOp):
                # paired: x² is not rescaled here; the Linear after it is (fewer values, and the
                # rescale of (Δ·2^w)²·2^w by its (scale_bits + 2w)-bit prime leaves Δ·2^w, a Linear's own scale)
                values = [self._square(value, rescale=not self.paired) for value in values]
                continue
            last = index + 1 == len(self.ops)
            needed = np.ones(len(op.bias), dtype=bool) if last else self.live[index + 1]
            if self.paired:
                values = self._paired_linear(index, op, values, needed)
                continue
            # the last Linear of a chain planned without its rescale (HEParams.last_scale_bits)
            scale_bits = self.public.params.last_scale_bits if last else None
            values = [self._neuron(values, row, float(bias), scale_bits) if use else None
                      for row, bias, use in zip(op.weight, op.bias, needed)]
        return [self.public.encrypt(value) if isinstance(value, float) else value for value in values]

    def _square(self, value, rescale: bool = True):
        if value is None or isinstance(value, float):
            return value if value is None else value * value
        return self.public.square(value, relinearize=False, rescale=rescale)

    def _paired_linear(self, index: int, op: LinearOp, values: list, needed: np.ndarray) -> list:
        """One Linear of the paired chain: bias + Σ weight·value at scale Δ·2^w — the first as it
        is, every later one (its inputs are x² values at (Δ·2^w)²) after one rescale; the
        ciphertext terms as one residue-domain product, known constants folded into the bias."""
        cipher = np.array([value is not None and not isinstance(value, float) for value in values])
        constant = np.array([value if isinstance(value, float) else 0.0 for value in values])
        bias = op.bias + op.weight @ constant
        rows = np.flatnonzero(needed)
        weight_scale = float(2**self.public.params.weight_scale_bits)
        columns = np.flatnonzero(cipher)
        results: dict[int, object] = {}
        if len(columns):
            key = (index, np.packbits(cipher).tobytes(), self.public.params.weight_scale_bits)
            if key not in self._residue:
                self._residue[key] = ResidueLinear(op.weight[np.ix_(rows, columns)], weight_scale)
            layer = self._residue[key]
            inputs = [values[j] for j in columns]
            try:
                if not layer.usable:
                    raise LayoutError("weights too wide for exact float64 limbs")
                # the inputs are never read again: their memory becomes the outputs
                produced = layer.apply(self.public.evaluator, self.public.context, inputs, weight_scale, consume=True)
                self.public.counts["multiply_plain"] += int(np.count_nonzero(layer.integers))
            except LayoutError:  # another SEAL build: the same products, one SEAL call per weight
                produced = {k: total for k in range(len(rows)) if (total := self._weighted_sum(
                    inputs, layer.integers[k] / weight_scale, weight_scale)) is not None}
            results = {int(rows[k]): ciphertext for k, ciphertext in produced.items()}
        out: list = [None] * len(op.bias)
        for row in rows:
            ciphertext = results.get(int(row))
            if ciphertext is None:  # every weight reading a ciphertext is zero: a known constant
                out[row] = float(bias[row])
                continue
            ciphertext = self.public.relinearize(ciphertext)
            if index:  # after an x²: (Δ·2^w)²·2^w, rescaled by its prime (scale_bits + 2w bits) to Δ·2^w
                self.public.evaluator.rescale_to_next_inplace(ciphertext)
                ciphertext.scale = self.public.params.scale * weight_scale
            out[row] = self.public.add_plain(ciphertext, float(bias[row]))
        return out

    def _weighted_sum(self, ciphertexts: list, weights, scale: float):
        """Σ weight·ciphertext by SEAL, one product per weight encoded at ``scale`` (None if every
        weight is zero at that scale: SEAL refuses an all-zero product)."""
        total = None
        for value, weight in zip(ciphertexts, weights):
            if abs(weight) * scale < 0.5:
                continue
            term = self.public.multiply_encoded(value, self.public.encode(float(weight), value.parms_id(), scale))
            total = term if total is None else self.public.add_inplace(total, term)
        return total

    def _neuron(self, values: list, row: np.ndarray, bias: float, scale_bits: int | None = None):
        """bias + Σ weight·value, rescaled; with ``scale_bits`` the weights are encoded at
        2^scale_bits and the sum is not rescaled (it stays at scale Δ·2^scale_bits)."""
        scale = self.public.params.scale if scale_bits is None else float(2**scale_bits)
        kept = [(value, weight) for value, weight in zip(values, row) if weight != 0.0 and value is not None]
        constant = bias + sum(value * weight for value, weight in kept if isinstance(value, float))
        cipher = [(value, weight) for value, weight in kept if not isinstance(value, float)]
        total = self._weighted_sum([v for v, _ in cipher], [w for _, w in cipher], scale)
        if total is None:
            return constant
        total = self.public.relinearize(total)
        return self.public.add_plain(total if scale_bits is not None else self.public.rescale(total), constant)


# --- batched chunks on several host processes ------------------------------------------------


def host_workers(config: HEConfig, chunks: int) -> int:
    """Host processes for ``chunks`` ciphertext batches: ``encrypt.he.host_workers``, 0 = one per
    core this process may run on; never more than the chunks. Each holds one chunk's ciphertexts
    (784 features of 8,192 samples at N=16384: ~300 MiB in as seeded ciphertexts, ~1.5 GiB while
    evaluated). On 2 cores, CryptoNets' network (trained, 14,000 real MNIST samples, 2 chunks):
    two hosts 1.43 / 1.48 / 1.46 ms/sample, one host beside the client 1.52 / 1.69 / 1.49
    (alternating runs; the hosts start while the client encrypts, which they share a core with)."""
    wanted = config.host_workers or len(os.sched_getaffinity(0))  # the cores this process may use
    return max(1, min(wanted, chunks))


_HOST: dict = {}  # per worker process: the public context and server of the run it serves


def _host(context_bytes: bytes, ops: list[Op]):
    """This process's server for the run whose public context is ``context_bytes``, built once.
    Context and model come with the tasks, not as pool initargs: a spawned worker reads its
    initargs only after it has imported the parent's main module, and the parent blocks writing
    them (megabytes) into the pipe all that time, once per worker."""
    if _HOST.get("context") != context_bytes:
        import torch
        from threadpoolctl import threadpool_limits

        # one core per host process: torch's and BLAS's (the residue products) thread pools both,
        # else two hosts on two cores run four BLAS threads that spin against each other
        torch.set_num_threads(1)
        threadpool_limits(1)
        public = PublicContext.deserialize(context_bytes)  # the host gets bytes only: no secret key
        _HOST.update(context=context_bytes, public=public, server=BatchedServer(public, ops))
    return _HOST["public"], _HOST["server"]


def _host_ready(context_bytes: bytes, ops: list[Op]) -> None:
    """Submitted once per worker: every host process starts and loads the context while the
    client encrypts the first chunk, not after it."""
    _host(context_bytes, ops)


def _host_chunk(context_bytes: bytes, ops: list[Op], payload: bytes) -> tuple[bytes, float]:
    """A host process's work on one chunk: ciphertext bytes in, ciphertext bytes out."""
    public, server = _host(context_bytes, ops)
    started = time.perf_counter()
    reply = public.dump_ciphertexts(server.infer(public.load_ciphertexts(payload)))
    return reply, time.perf_counter() - started


def _parallel_hosts(holder: KeyHolder, context_bytes: bytes, ops: list[Op], required: list[int],
                    inputs: np.ndarray, chunks: list[slice], workers: int, advance, finished: list) -> list:
    """The batched round trip with ``workers`` host processes: the client encrypts the next chunk
    while the hosts evaluate earlier ones (at most ``workers`` + 1 chunks in flight — one waits
    encrypted for the next free host — so memory stays that many chunks' ciphertexts), then
    decrypts each reply in order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    results: list = [None] * len(chunks)
    pending: dict = {}

    def collect(index: int) -> None:
        future, sent = pending.pop(index)
        reply, seconds = future.result()
        outputs = holder.public.load_ciphertexts(reply)
        count = chunks[index].stop - chunks[index].start
        results[index] = (np.stack([holder.decrypt(ct)[:count] for ct in outputs], axis=1), seconds, sent, len(reply))
        finished.append(index)
        advance(f"{chunks[index].stop}/{len(inputs)} samples")

    # spawn: the pipeline runs tasks in threads, and a forked copy of a threaded process can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        for _ in range(workers):  # the pool starts a process per submit while none is idle
            pool.submit(_host_ready, context_bytes, ops)
        for index, chunk in enumerate(chunks):
            if len(pending) > workers:  # one chunk queued ahead: the client encrypts while every host is busy
                collect(min(pending))
            features = inputs[chunk].reshape(chunk.stop - chunk.start, -1).astype(np.float64)
            payload = holder.encrypt_bundle([features[:, i] for i in required])
            pending[index] = (pool.submit(_host_chunk, context_bytes, ops, payload), len(payload))
        while pending:
            collect(min(pending))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
