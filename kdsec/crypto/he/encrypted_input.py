"""Encrypted-input mode: the host holds the plaintext model and a public context; the client's
data stays encrypted. Two paths:

- *batched* (``BatchedServer``): one ciphertext per input feature, its slots holding that
  feature for up to N/2 samples (CryptoNets). On the *paired* chain (students that alternate
  Linear and x²; ``HEParams.weight_scale_bits``) each Linear is one exact residue-domain matrix
  product (``residue.ResidueLinear``), its weights integers at 2^w, rescaled only after an x²
  (one 60-bit prime per x²). On the *classic* chain a Linear is a weighted sum of ciphertexts
  with plaintext scalars, rescaled once per neuron — but the last, whose weights are encoded at
  2^last_scale_bits and whose sums stay in the 60-bit decryption prime where the parameters say
  so. Zero (pruned) weights, and neurons nothing downstream reads, are skipped. No rotations.
- *single* (``GridPlan``, ``SingleServer``): one sample in one ciphertext laid out as an R×C
  grid, x copied into every row. Linear layers alternate between reducing along a row (result
  in column 0) and along a column (result in row 0); each is one plaintext product plus log2
  rotations, so latency does not grow with the number of weights. Where no grid fits a ring
  (conv students), ``DiagonalPlan``/``DiagonalServer``: a product per non-zero diagonal.

``run_encrypted_input`` is the round trip: client encrypts → host evaluates → client decrypts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdsec.config import HEConfig
from kdsec.crypto.he.program import (LinearOp, Op, SquareOp, alternates, batched_params, doubling_steps, he_params,
                                     largest_ring, linear_ops, model_structure, next_pow2, sample_chunks)
from kdsec.crypto.he.residue import LayoutError, ResidueLinear
from kdsec.crypto.he.result import HERun, _summarize
from kdsec.crypto.seal import KeyHolder, PublicContext
from kdsec.errors import KdsecError
from kdsec.fileio import write_atomic
from kdsec.progress import progress

logger = logging.getLogger("kdsec")


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
                produced = {k: total for k in range(len(rows))
                            if (total := self._weighted_sum(inputs, layer.integers[k], weight_scale)) is not None}
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

    def _weighted_sum(self, inputs: list, integers: np.ndarray, weight_scale: float):
        """Σ integers[j]/weight_scale · inputs[j] by SEAL, weights encoded at ``weight_scale``."""
        total = None
        for value, integer in zip(inputs, integers):
            if integer == 0:
                continue
            plain = self.public.encode(float(integer) / weight_scale, value.parms_id(), weight_scale)
            term = self.public.multiply_encoded(value, plain)
            total = term if total is None else self.public.add_inplace(total, term)
        return total

    def _neuron(self, values: list, row: np.ndarray, bias: float, scale_bits: int | None = None):
        """bias + Σ weight·value, rescaled; with ``scale_bits`` the weights are encoded at
        2^scale_bits and the sum is not rescaled (it stays at scale Δ·2^scale_bits)."""
        total, constant = None, bias
        scale = self.public.params.scale if scale_bits is None else float(2**scale_bits)
        for value, weight in zip(values, row):
            if weight == 0.0 or value is None:
                continue
            if isinstance(value, float):
                constant += value * weight
                continue
            if abs(weight) * scale < 0.5:  # zero once encoded at this scale (SEAL refuses an all-zero product)
                continue
            term = self.public.multiply_encoded(value, self.public.encode(float(weight), value.parms_id(), scale))
            total = term if total is None else self.public.add_inplace(total, term)
        if total is None:
            return constant
        total = self.public.relinearize(total)
        return self.public.add_plain(total if scale_bits is not None else self.public.rescale(total), constant)


# --- encrypted input, single sample ------------------------------------------------------------


@dataclass(frozen=True)
class GridPlan:
    """The single-sample layout: an R×C grid; Linear ``t`` reduces along rows when ``t`` is even
    (result in column 0) and along columns when odd (result in row 0)."""

    rows: int
    cols: int
    steps: tuple[int, ...]

    @classmethod
    def for_ops(cls, ops: list[Op]) -> GridPlan:
        linears = linear_ops(ops)
        row_dims = [l.weight.shape[0] if t % 2 == 0 else l.weight.shape[1] for t, l in enumerate(linears)]
        col_dims = [l.weight.shape[1] if t % 2 == 0 else l.weight.shape[0] for t, l in enumerate(linears)]
        rows, cols = next_pow2(max(row_dims)), next_pow2(max(col_dims))
        return cls(rows, cols, tuple(sorted(set(s for t in range(len(linears)) for s in cls._steps(linears, t, cols)))))

    @staticmethod
    def _steps(linears: list[LinearOp], t: int, cols: int) -> list[int]:
        out_dim, in_dim = linears[t].weight.shape
        spread = [] if t == 0 else (doubling_steps(out_dim, 1, -1) if t % 2 else doubling_steps(out_dim, cols, -1))
        reduce = doubling_steps(in_dim, 1) if t % 2 == 0 else doubling_steps(in_dim, cols)
        return spread + reduce

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops) + len(linear_ops(ops)) - 1  # a mask before every Linear but the first

    @property
    def slots(self) -> int:
        return self.rows * self.cols

    def encode_input(self, sample: np.ndarray) -> np.ndarray:
        grid = np.zeros((self.rows, self.cols))
        flat = sample.reshape(-1)
        grid[:, : len(flat)] = flat
        return grid.reshape(-1)

    def output_slots(self, ops: list[Op]) -> np.ndarray:
        linears = linear_ops(ops)
        out_dim = linears[-1].weight.shape[0]
        return np.arange(out_dim) * self.cols if (len(linears) - 1) % 2 == 0 else np.arange(out_dim)


class SingleServer:
    """Encrypted-input host, single-sample path (rotations; latency independent of weight count)."""

    def __init__(self, public: PublicContext, ops: list[Op]) -> None:
        self.public, self.ops, self.plan = public, ops, GridPlan.for_ops(ops)

    def infer(self, ciphertexts: list) -> list:
        (value,) = ciphertexts
        rows, cols = self.plan.rows, self.plan.cols
        linear_index = 0
        for op in self.ops:
            if isinstance(op, SquareOp):
                value = self.public.square(value)
                continue
            out_dim, in_dim = op.weight.shape
            grid = np.zeros((rows, cols))
            bias = np.zeros((rows, cols))
            if linear_index % 2 == 0:  # input copied along rows → reduce along each row into column 0
                if linear_index:
                    value = self._spread(value, mask_row=True, count=out_dim, stride=cols)
                grid[:out_dim, :in_dim] = op.weight
                bias[:out_dim, 0] = op.bias
                reduce = doubling_steps(in_dim, 1)
            else:  # input in column 0 → copy along columns, reduce down each column into row 0
                value = self._spread(value, mask_row=False, count=out_dim, stride=1)
                grid[:in_dim, :out_dim] = op.weight.T
                bias[0, :out_dim] = op.bias
                reduce = doubling_steps(in_dim, cols)
            value = self.public.rescale(self.public.multiply_plain(value, grid.reshape(-1)))
            value = self.public.rotate_and_sum(value, reduce)
            value = self.public.add_plain(value, bias.reshape(-1))
            linear_index += 1
        return [value]

    def _spread(self, value, mask_row: bool, count: int, stride: int):
        """Keep only the previous result (row 0 or column 0), then copy it ``count`` times."""
        mask = np.zeros((self.plan.rows, self.plan.cols))
        if mask_row:
            mask[0, :] = 1.0
        else:
            mask[:, 0] = 1.0
        value = self.public.rescale(self.public.multiply_plain(value, mask.reshape(-1)))
        return self.public.rotate_and_sum(value, doubling_steps(count, stride, -1))


@dataclass(frozen=True)
class DiagonalPlan:
    """The single-sample layout for students whose grid does not fit a ring (conv students: a
    784 → 576 convolution): the sample as a vector in slots [0, n), zeros elsewhere; each Linear
    y = W·v as a sum over W's generalized diagonals, diag_k[i] = W[i, i + k], of diag_k ⊙ rot(v, k)
    (Halevi–Shoup), only for the diagonals that hold a non-zero weight, with baby-step giant-step
    rotations: rot(v, g·b + j) = rot(rot(v, j), g·b), the giant rotation applied once per group
    to the sum of its products with pre-rotated diagonals. Nothing wraps around as long as the
    ring has n + m slots for every layer; x² is one product. Latency grows with the number of
    non-zero diagonals (plaintext products) and √ of their span (rotations)."""

    baby: int
    steps: tuple[int, ...]
    width: int  # the most slots a layer needs (n + m)

    @classmethod
    def for_ops(cls, ops: list[Op]) -> DiagonalPlan:
        """The rotation steps come from the shapes only (every diagonal a layer could have), so
        the keys a host asks for say nothing of which weights are zero."""
        linears = linear_ops(ops)
        span = max(l.weight.shape[0] + l.weight.shape[1] for l in linears)
        baby = max(1, int(np.ceil(np.sqrt(span))))
        steps = set(range(1, baby))
        for linear in linears:
            out_dim, in_dim = linear.weight.shape
            steps.update(g * baby for g in range(-(out_dim - 1) // baby, (in_dim - 1) // baby + 1) if g)
        return cls(baby, tuple(sorted(steps)), span)

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops)

    @property
    def slots(self) -> int:
        return next_pow2(self.width)

    @staticmethod
    def encode_input(sample: np.ndarray) -> np.ndarray:
        return sample.reshape(-1)

    def output_slots(self, ops: list[Op]) -> np.ndarray:
        return np.arange(linear_ops(ops)[-1].weight.shape[0])


def _diagonals(weight: np.ndarray) -> np.ndarray:
    """The k of W's generalized diagonals that hold a non-zero weight (k = column − row)."""
    rows, cols = np.nonzero(weight)
    return np.unique(cols - rows)


class DiagonalServer:
    """Encrypted-input host, single-sample diagonal path (``DiagonalPlan``): the diagonals are
    encoded once, at the level where each layer uses them."""

    def __init__(self, public: PublicContext, ops: list[Op]) -> None:
        self.public, self.ops, self.plan = public, ops, DiagonalPlan.for_ops(ops)
        self.slots = public.params.slots
        self.layers = []  # per Linear: {giant step: [(baby step, encoded rotated diagonal)]}, bias
        level = 0
        for op in ops:
            if isinstance(op, SquareOp):
                level += 1
                continue
            parms_id = public.parms_id_at(level)
            out_dim, in_dim = op.weight.shape
            groups: dict[int, list] = {}
            for k in _diagonals(op.weight):
                rows = np.arange(max(0, -k), min(out_dim, in_dim - k))
                diagonal = np.zeros(self.slots)
                diagonal[rows] = op.weight[rows, rows + k]
                if np.abs(diagonal).max() * public.params.scale < 0.5:  # encodes to zero: SEAL refuses the product
                    continue
                giant, baby = divmod(int(k), self.plan.baby)
                # diag ⊙ rot(v, g·b + j) summed, then rotated by g·b: pre-rotate the diagonal by −g·b
                rotated = np.roll(diagonal, giant * self.plan.baby)
                groups.setdefault(giant * self.plan.baby, []).append((baby, public.encode(rotated, parms_id)))
            bias = np.zeros(self.slots)
            bias[:out_dim] = op.bias
            self.layers.append((groups, bias))
            level += 1

    @staticmethod
    def encoded_bytes(ops: list[Op], params) -> int:
        """Memory the encoded diagonals of ``ops`` may take under ``params`` (what a host holds per
        session besides its keys), from the shapes only, so that the figure a client sees says
        nothing of which weights are zero: a plaintext per possible diagonal (m + n − 1 for an
        m × n layer), N coefficients over the data primes left at its layer's level (every op
        before it used one), 8 bytes each."""
        primes = len(params.coeff_mod_bit_sizes) - 1
        return sum((sum(op.weight.shape) - 1) * params.poly_modulus_degree * (primes - level) * 8
                   for level, op in enumerate(ops) if isinstance(op, LinearOp))

    def infer(self, ciphertexts: list) -> list:
        (value,) = ciphertexts
        public, linear = self.public, 0
        for op in self.ops:
            if isinstance(op, SquareOp):
                value = public.square(value)
                continue
            groups, bias = self.layers[linear]
            babies = {0: value}
            for baby in sorted({j for terms in groups.values() for j, _ in terms} - {0}):
                babies[baby] = public.rotate(value, baby)
            total = None
            for giant, terms in groups.items():
                part = None
                for baby, plain in terms:
                    term = public.multiply_encoded(babies[baby], plain)
                    part = term if part is None else public.add_inplace(part, term)
                if giant:
                    part = public.rotate(part, giant)
                total = part if total is None else public.add_inplace(total, part)
            value = public.add_plain(public.rescale(total), bias)
            linear += 1
        return [value]


def single_plan(ops: list[Op], config: HEConfig) -> GridPlan | DiagonalPlan:
    """The single-sample layout: the grid (one product per layer) where it fits the ring, else the
    diagonal plan (a product per non-zero diagonal)."""
    grid = GridPlan.for_ops(ops)
    return grid if grid.slots <= largest_ring(config) // 2 else DiagonalPlan.for_ops(ops)


def single_params(plan: GridPlan | DiagonalPlan, ops: list[Op], config: HEConfig):
    """The single-sample path's parameters: the usual chain (its plaintexts are vectors, whose
    encoding error at an unrescaled last layer's small scale would be ~1e-3 per slot)."""
    return he_params(config, plan.depth(ops), plan.slots)


# --- the round trip: client encrypts, host evaluates, client decrypts -------------------------


def run_encrypted_input(ops: list[Op], inputs: np.ndarray, config: HEConfig, path: str = "batched",
                        wire: bool = True, package_dir: Path | None = None,
                        model_predictions: np.ndarray | None = None) -> tuple[np.ndarray, HERun]:
    """Client encrypts ``inputs`` → host (public context only) evaluates → client decrypts.
    With ``wire``, ciphertexts and context cross as bytes, as they would over a network.
    ``model_predictions`` (the deployed model's own labels) give ``agreement_with_model``."""
    if path == "batched":
        plan, params = None, BatchedServer.params(ops, config)
        holder = KeyHolder(params)
    else:
        plan = single_plan(ops, config)
        params = single_params(plan, ops, config)
        holder = KeyHolder(params, plan.steps)
    context_bytes = holder.public_context()
    if package_dir is not None and path == "batched":
        write_atomic(package_dir / "encrypted_input.public_context.bin", context_bytes)
    public = PublicContext.deserialize(context_bytes) if wire else holder.public
    if path == "batched":  # built only if the chunks run in this process (not in host processes)
        server = None
    else:
        server = SingleServer(public, ops) if isinstance(plan, GridPlan) else DiagonalServer(public, ops)
    batch = params.slots if path == "batched" else 1
    required = BatchedServer.required_inputs(ops)
    logits, server_seconds, bytes_in, bytes_out = [], 0.0, 0, 0
    started = time.perf_counter()
    chunks = list(sample_chunks(len(inputs), batch))
    workers = host_workers(config, len(chunks)) if path == "batched" and wire else 1
    with progress(f"HE encrypted input ({path})", len(chunks)) as advance:
        results = []
        # host processes beside the client: batched chunks only (the single path is one sample a round trip)
        if path == "batched" and wire and workers > 1:
            from concurrent.futures.process import BrokenProcessPool

            finished: list = []
            try:
                results = _parallel_hosts(holder, context_bytes, ops, required, inputs, chunks, workers, advance,
                                          finished)
            except BrokenProcessPool as error:
                if finished:  # a host died mid-run (e.g. out of memory): not something to redo here
                    raise KdsecError(f"an HE host process died after {len(finished)} of {len(chunks)} chunks; "
                                     "lower encrypt.he.host_workers (or set it to 1)") from error
                # e.g. a __main__ script without the `if __name__ == "__main__"` guard
                logger.warning("HE host processes could not start; evaluating the chunks in this process "
                               "(encrypt.he.host_workers=1 skips the attempt)")
        if not results:
            server = server or BatchedServer(public, ops)
            for chunk in chunks:
                results.append(_round_trip(holder, public, server, plan, required, ops, inputs[chunk], wire))
                advance(f"{chunk.stop}/{len(inputs)} samples")
        for chunk_logits, seconds, sent, received in results:
            logits.append(chunk_logits)
            server_seconds, bytes_in, bytes_out = server_seconds + seconds, bytes_in + sent, bytes_out + received
    elapsed = time.perf_counter() - started
    return _summarize("encrypted_input", path, ops, inputs, np.concatenate(logits), elapsed, server_seconds,
                      bytes_in, bytes_out, len(context_bytes), len(context_bytes), params,
                      holder.secret_key_in(context_bytes), model_predictions)


def _round_trip(holder: KeyHolder, public: PublicContext, server, plan: GridPlan | None, required: list[int],
                ops: list[Op], samples: np.ndarray, wire: bool) -> tuple[np.ndarray, float, int, int]:
    """One ciphertext batch (``plan``: the single-sample layout, None for batched): the client
    encrypts, the host evaluates, the client decrypts. (logits, host seconds, bytes in, bytes out)."""
    features = samples.reshape(len(samples), -1).astype(np.float64)
    rows = [features[:, index] for index in required] if plan is None else [plan.encode_input(features[0])]
    payload = holder.encrypt_bundle(rows) if wire else None
    encrypted = None if wire else [holder.encrypt(row) for row in rows]
    server_started = time.perf_counter()
    outputs = server.infer(public.load_ciphertexts(payload) if wire else encrypted)
    reply = public.dump_ciphertexts(outputs) if wire else None
    seconds = time.perf_counter() - server_started
    if wire:
        outputs = holder.public.load_ciphertexts(reply)
    if plan is None:
        logits = np.stack([holder.decrypt(ct)[: len(features)] for ct in outputs], axis=1)
    else:
        logits = holder.decrypt(outputs[0])[plan.output_slots(ops)][None, :]
    return logits, seconds, len(payload) if wire else 0, len(reply) if wire else 0


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
