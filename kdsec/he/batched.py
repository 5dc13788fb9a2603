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
from kdsec.he.ops import LinearOp, Op, SquareOp, alternates, batched_params, model_structure
from kdsec.he.residue import LayoutError, ResidueLinear
from kdsec.he.seal import KeyHolder, PublicContext
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
        return self._evaluate(values, 0)

    def stream(self) -> BatchedStream:
        """A chunk whose features arrive in groups (``BatchedStream``)."""
        return BatchedStream(self)

    def _evaluate(self, values: list, start: int) -> list:
        """The ops from ``start`` on, applied to ``values`` (one per input of op ``start``)."""
        for index in range(start, len(self.ops)):
            op = self.ops[index]
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
        produced: dict[int, object] = {}
        if len(columns):
            layer = self._residue_layer(index, op, cipher, rows)
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
        return self._paired_outputs(index, op, rows, produced, bias)

    def _residue_layer(self, index: int, op: LinearOp, cipher: np.ndarray, rows: np.ndarray) -> ResidueLinear:
        """Op ``index``'s residue layer for ciphertext inputs ``cipher`` (mask) and kept ``rows``, built once."""
        key = (index, np.packbits(cipher).tobytes(), self.public.params.weight_scale_bits)
        if key not in self._residue:
            self._residue[key] = ResidueLinear(op.weight[np.ix_(rows, np.flatnonzero(cipher))],
                                               float(2**self.public.params.weight_scale_bits))
        return self._residue[key]

    def _paired_outputs(self, index: int, op: LinearOp, rows: np.ndarray, produced: dict, bias: np.ndarray) -> list:
        """Op ``index``'s values from its products (``produced``: kept row k → ciphertext): relinearized,
        rescaled after an x², plus the bias; a row no ciphertext reaches is the constant bias."""
        weight_scale = float(2**self.public.params.weight_scale_bits)
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


class BatchedStream:
    """One chunk's input features as they arrive, in order, in contiguous groups (``feed``): on the
    paired chain the first Linear's residue products are summed group by group (``ResidueLinear.
    accumulate``), so a host computes while its client still encrypts the rest; ``finish``
    evaluates the other ops. Where the residue path does not apply, the groups are kept and
    ``finish`` evaluates them at once (``BatchedServer.infer``): the same logits either way."""

    def __init__(self, server: BatchedServer) -> None:
        self.server, self.received, self.kept, self.outputs = server, 0, [], None
        self.count = int(np.count_nonzero(server.live[0]))
        self.layer = None
        if server.paired:
            ops = server.ops
            self.rows = np.flatnonzero(server.live[1] if len(ops) > 1 else np.ones(len(ops[0].bias), dtype=bool))
            layer = server._residue_layer(0, ops[0], server.live[0], self.rows)
            self.layer = layer if layer.usable else None

    def feed(self, ciphertexts: list) -> None:
        """The next ``len(ciphertexts)`` required input features (``BatchedServer.required_inputs``)."""
        if self.received + len(ciphertexts) > self.count:
            raise KdsecError(f"expected {self.count} encrypted input features, got more")
        public = self.server.public
        if self.layer is not None:
            try:
                self.outputs = self.layer.accumulate(public.evaluator, public.context, ciphertexts, self.received,
                                                     float(2**public.params.weight_scale_bits), self.outputs)
            except LayoutError:
                if self.outputs is not None:
                    raise
                self.layer = None  # another SEAL build: keep the groups, evaluate them at the end
        if self.layer is None:
            self.kept.extend(ciphertexts)
        self.received += len(ciphertexts)

    def finish(self) -> list:
        if self.received != self.count:
            raise KdsecError(f"expected {self.count} encrypted input features, got {self.received}")
        if self.layer is None:
            return self.server.infer(self.kept)
        server, op = self.server, self.server.ops[0]
        server.public.counts["multiply_plain"] += int(np.count_nonzero(self.layer.integers))
        values = server._paired_outputs(0, op, self.rows, self.outputs or {}, op.bias)
        return server._evaluate(values, 1)


# --- batched chunks on several host processes ------------------------------------------------


def host_workers(config: HEConfig, chunks: int) -> int:
    """Host processes for ``chunks`` ciphertext batches: ``encrypt.he.host_workers``, 0 = one per
    core this process may run on; never more than the chunks. Each holds one chunk's ciphertexts
    (784 features of 8,192 samples at N=16384: ~300 MiB in as seeded ciphertexts, ~1.5 GiB while
    evaluated) and imports no torch (~50 MiB and 0.4 s to start, not ~830 MiB and 4 s). On 2 cores,
    CryptoNets' network (trained, 14,000 real MNIST samples, 2 chunks), features sent in GROUPS
    messages against one (the same code otherwise), alternating runs: 1.71 / 1.55 / 1.66 against
    2.29 / 2.05 / 1.81 ms/sample; this shared machine's figures drift ±20 % within minutes."""
    wanted = config.host_workers or len(os.sched_getaffinity(0))  # the cores this process may use
    return max(1, min(wanted, chunks))


GROUPS = 4  # messages a chunk's features travel in: a host starts on the first while its client encrypts the rest


def feature_groups(required: list[int]) -> list[np.ndarray]:
    """The required input features (``BatchedServer.required_inputs``) in the ``GROUPS``
    contiguous groups a chunk travels in, in order."""
    return [group for group in np.array_split(np.asarray(required), min(GROUPS, len(required))) if len(group)]


class HostDied(KdsecError):
    """A host process ended without answering (it could not start, or was killed)."""


def _host_loop(connection) -> None:
    """A host process: a public context and the model first, then chunks, each as feature groups
    (ciphertext bytes) closed by "finish", answered with the output ciphertexts' bytes and the
    seconds spent; None ends it. It never sees a secret key, and imports no torch (``ops``)."""
    from threadpoolctl import threadpool_limits

    # one core per host process: BLAS's thread pool (the residue products), else two hosts on two
    # cores run four BLAS threads that spin against each other
    threadpool_limits(1)
    try:
        context_bytes, ops = connection.recv()
        public = PublicContext.deserialize(context_bytes)  # the host gets bytes only: no secret key
        server = BatchedServer(public, ops)
        connection.send(("ready",))
        stream, seconds = None, 0.0
        while (message := connection.recv()) is not None:
            started = time.perf_counter()
            if isinstance(message, bytes):
                stream = stream or server.stream()
                stream.feed(public.load_ciphertexts(message))
                seconds += time.perf_counter() - started
                continue
            reply = public.dump_ciphertexts(stream.finish())
            connection.send(("reply", reply, seconds + time.perf_counter() - started))
            stream, seconds = None, 0.0
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return
    except Exception as exc:  # to the client in one line; the process ends
        try:
            connection.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))
        except OSError:
            pass


def _hand_over(connection, message) -> None:
    try:
        connection.send(message)
    except OSError:  # the host died before reading it: the first group's send says so
        pass


def _answer(connection) -> tuple[bytes, float]:
    """The next reply from a host (past its "ready"), or HostDied / its error."""
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            raise HostDied("an HE host process ended without answering") from None
        if message[0] == "reply":
            return message[1], message[2]
        if message[0] == "error":
            raise KdsecError(f"HE host process: {message[1]}")


def _parallel_hosts(holder: KeyHolder, context_bytes: bytes, ops: list[Op], required: list[int],
                    inputs: np.ndarray, chunks: list[slice], workers: int, advance, finished: list) -> list:
    """The batched round trip with ``workers`` host processes: each chunk goes to one host in
    ``GROUPS`` messages of its features, so the host sums the first layer's products while the
    client encrypts the next group; chunks go to the hosts in waves of one per host, the wave's
    groups encrypted in turn (group 1 of every chunk, then group 2, ...), so every host starts on
    its first group while the client encrypts the rest; a host's previous reply is collected
    before it gets another chunk: at most ``workers`` chunks in flight, so memory stays that many
    chunks' ciphertexts. The client decrypts each reply."""
    from multiprocessing import get_context

    context = get_context("spawn")  # the pipeline runs tasks in threads: a forked copy could deadlock
    hosts = []
    results: list = [None] * len(chunks)
    busy: dict[int, tuple[int, int]] = {}  # host → (chunk, bytes sent)
    groups = feature_groups(required)

    def collect(host: int) -> None:
        index, sent = busy.pop(host)
        reply, seconds = _answer(hosts[host][1])
        outputs = holder.public.load_ciphertexts(reply)
        count = chunks[index].stop - chunks[index].start
        results[index] = (np.stack([holder.decrypt(ct)[:count] for ct in outputs], axis=1), seconds, sent, len(reply))
        finished.append(index)
        advance(f"{chunks[index].stop}/{len(inputs)} samples")

    import threading

    handshakes = []  # the context and model go to each host from a thread: a send blocks until that host reads it
    try:
        for _ in range(workers):  # they start (and load the context) while the client encrypts
            ours, theirs = context.Pipe()
            try:
                process = context.Process(target=_host_loop, args=(theirs,), daemon=True)
                process.start()
            finally:
                theirs.close()
            hosts.append((process, ours))
            handshakes.append(threading.Thread(target=_hand_over, args=(ours, (context_bytes, ops)), daemon=True))
            handshakes[-1].start()
        for first in range(0, len(chunks), workers):  # a wave: a chunk per host, their groups in turn
            wave = range(first, min(first + workers, len(chunks)))
            features = [inputs[chunks[index]].reshape(-1, inputs[0].size).astype(np.float64) for index in wave]
            sent = dict.fromkeys(wave, 0)
            for number, group in enumerate(groups):
                for index, values in zip(wave, features, strict=True):
                    host = index % workers
                    payload = holder.encrypt_bundle([values[:, i] for i in group])
                    if number == 0:
                        if host in busy:  # its last reply first: it cannot read while its reply waits
                            collect(host)
                        handshakes[host].join()  # one writer at a time on a pipe
                    hosts[host][1].send(payload)
                    sent[index] += len(payload)
            for index in wave:
                hosts[index % workers][1].send("finish")
                busy[index % workers] = (index, sent[index])
        for host in sorted(busy, key=lambda h: busy[h][0]):
            collect(host)
    except (BrokenPipeError, ConnectionResetError) as error:
        for _, connection in hosts:  # a host that failed said why before it went
            try:
                while connection.poll(0):
                    message = connection.recv()
                    if message[0] == "error":
                        raise KdsecError(f"HE host process: {message[1]}") from None
            except (EOFError, OSError):
                continue
        raise HostDied("an HE host process ended without answering") from error
    finally:
        for process, connection in hosts:
            try:
                connection.send(None)
            except OSError:
                pass
            connection.close()
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    return results
