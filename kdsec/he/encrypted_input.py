"""Encrypted-input mode: the host holds the plaintext model and a public context; the client's
data stays encrypted. Two paths:

- *batched* (``batched.BatchedServer``, and the host processes that run its chunks): one
  ciphertext per input feature, its slots holding that feature for up to N/2 samples (CryptoNets).
- *single* (``GridPlan``, ``SingleServer``): one sample in one ciphertext laid out as an R×C
  grid, x copied into every row. Linear layers alternate between reducing along a row (result
  in column 0) and along a column (result in row 0); each is one plaintext product plus log2
  rotations, so latency does not grow with the number of weights. Where no grid fits a ring
  (conv students), ``DiagonalPlan``/``DiagonalServer``: a product per non-zero diagonal.

``run_encrypted_input`` is the round trip: client encrypts → host evaluates → client decrypts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdsec.config import HEConfig
from kdsec.he.batched import BatchedServer, HostDied, _parallel_hosts, host_workers
from kdsec.he.gather import GatherPlan, GatherServer, gather_params
from kdsec.he.ops import (LinearOp, Op, SquareOp, alternates, baby_giant_sum, doubling_steps, he_params,
                                 largest_ring, linear_ops, model_structure, next_pow2, sample_chunks)
from kdsec.he.result import HERun, _summarize
from kdsec.he.seal import KeyHolder, PublicContext
from kdsec.errors import ConfigError, KdsecError
from kdsec.fileio import write_atomic
from kdsec.progress import progress

logger = logging.getLogger("kdsec")


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
            value = public.add_plain(public.rescale(baby_giant_sum(public, value, groups)), bias)
            linear += 1
        return [value]


SinglePlan = GridPlan | GatherPlan | DiagonalPlan


def single_plan(ops: list[Op], config: HEConfig) -> SinglePlan:
    """The single-sample layout: the grid (one product per layer) where it fits the ring; else,
    for a program that alternates Linear and x² (conv students), the gather layout (``gather``:
    the client sends the first layer's windows, later layers by the hybrid diagonal method);
    else the diagonal plan (a product per non-zero diagonal)."""
    grid = GridPlan.for_ops(ops)
    if grid.slots <= largest_ring(config) // 2:
        return grid
    if alternates(model_structure(ops)):
        try:
            return GatherPlan.for_ops(ops, gather_params(ops, config).slots)
        except ConfigError:  # no ring holds its paired chain: the diagonal plan's classic one may
            pass
    return DiagonalPlan.for_ops(ops)


def single_params(plan: SinglePlan, ops: list[Op], config: HEConfig):
    """The single-sample path's parameters: the gather layout's paired chain (weights at 2^20), or
    the usual chain (its plaintexts are vectors, whose encoding error at an unrescaled last
    layer's small scale would be ~1e-3 per slot)."""
    if isinstance(plan, GatherPlan):
        return gather_params(ops, config)
    return he_params(config, plan.depth(ops), plan.slots)


def single_server(public: PublicContext, ops: list[Op], plan: SinglePlan):
    if isinstance(plan, GridPlan):
        return SingleServer(public, ops)
    return GatherServer(public, ops, plan) if isinstance(plan, GatherPlan) else DiagonalServer(public, ops)


# --- the round trip: client encrypts, host evaluates, client decrypts -------------------------


def run_encrypted_input(ops: list[Op], inputs: np.ndarray, config: HEConfig, path: str = "batched",
                        wire: bool = True, package_dir: Path | None = None,
                        model_predictions: np.ndarray | None = None,
                        cluster: tuple[str, float] | None = None) -> tuple[np.ndarray, HERun]:
    """Client encrypts ``inputs`` → host (public context only) evaluates → client decrypts.
    With ``wire``, ciphertexts and context cross as bytes, as they would over a network.
    ``model_predictions`` (the deployed model's own labels) give ``agreement_with_model``.
    ``cluster`` (a Dask scheduler's address, connect timeout): the batched chunks are evaluated
    by tasks on its workers (``kdsec.he.cluster``) instead of host processes here."""
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
        server = single_server(public, ops, plan)
    batch = params.slots if path == "batched" else 1
    required = BatchedServer.required_inputs(ops)
    logits, server_seconds, bytes_in, bytes_out = [], 0.0, 0, 0
    started = time.perf_counter()
    chunks = list(sample_chunks(len(inputs), batch))
    workers = host_workers(config, len(chunks)) if path == "batched" and wire and required else 1
    with progress(f"HE encrypted input ({path})", len(chunks)) as advance:
        results = []
        if path == "batched" and wire and required and cluster:
            from kdsec.he.cluster import cluster_hosts

            results = cluster_hosts(holder, context_bytes, ops, required, inputs, chunks, *cluster, advance)
        # host processes beside the client: batched chunks only (the single path is one sample a round trip)
        elif path == "batched" and wire and workers > 1:
            finished: list = []
            try:
                results = _parallel_hosts(holder, context_bytes, ops, required, inputs, chunks, workers, advance,
                                          finished)
            except HostDied as error:
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


def _round_trip(holder: KeyHolder, public: PublicContext, server, plan: SinglePlan | None, required: list[int],
                ops: list[Op], samples: np.ndarray, wire: bool) -> tuple[np.ndarray, float, int, int]:
    """One ciphertext batch (``plan``: the single-sample layout, None for batched): the client
    encrypts, the host evaluates, the client decrypts. (logits, host seconds, bytes in, bytes out)."""
    features = samples.reshape(len(samples), -1).astype(np.float64)
    rows = [features[:, index] for index in required] if plan is None else list(np.atleast_2d(
        plan.encode_input(features[0])))
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
