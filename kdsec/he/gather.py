"""Encrypted input, single sample, for programs that alternate Linear and x² (CryptoNets-style
conv students): the *gather* layout (after LoLa, Brutzkus et al. 2019), on the paired chain.

- **The first Linear, with no rotation.** The client knows the first layer's geometry (public:
  which inputs each output reads — a convolution's windows — never a weight) and sends, for each
  of the K inputs an output reads, the vector u_k[i] = x[column(i, k)]: the layer is then
  Σ_k w_k ⊙ u_k, a product per vector. The vectors are packed R to a ciphertext, in blocks of
  p₀ = pow2(outputs) slots (R = slots / p₀); log2(R) rotations sum the blocks, leaving the
  result in every block: a vector periodic in p₀, as the next layer wants it.
- **Every later Linear** (m × n) by Halevi–Shoup's hybrid method on that periodic vector: with
  m' = pow2(m) and a period p ≥ n, m' (a multiple of the input's), its m' extended diagonals
  d_k[j] = W[j mod m', (j + k) mod p] give z = Σ_k d_k ⊙ rot(v, k), and summing z's p/m' chunks
  (log2 rotations) leaves y = Wv in slots [0, m), periodic in m'. Baby-step giant-step: √m'
  rotations of v, √m' of the partial sums. So a 100 × 845 layer is 128 products and ~25
  rotations, not the ~1,600 diagonals of the diagonal layout.
- **The paired chain** (``seal.plan_paired``): the inputs at 2^20 and the weights at
  2^``GATHER_WEIGHT_SCALE_BITS`` (20: a weight *vector*'s encoding error is ~2^-15 of a unit,
  where the batched path's scalar weights are exact integers), x² not rescaled, the Linear after
  it rescaled once: N=16384 with four 60-bit primes for two x², where the classic chain needs
  seven (and every rotation costs ~2.7× as much).

``GatherPlan`` is the layout (from shapes and geometry, for one ring); ``GatherServer`` the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdsec.config import HEConfig
from kdsec.he.ops import (LinearOp, Op, alternates, baby_giant_sum, doubling_steps, linear_ops,
                                 model_structure, next_pow2)
from kdsec.he.params import MAX_MODULUS_BITS, HEParams, plan_paired
from kdsec.he.seal import PublicContext
from kdsec.errors import ConfigError, KdsecError

GATHER_WEIGHT_SCALE_BITS = 20  # weights and inputs at 2^20: 60-bit primes, the product back at 2^40 after each
GATHER_INPUT_BITS = 20
MAX_GATHER_VALUES = 1 << 22  # the first layer's outputs × the inputs each reads: what the client packs


def first_support(op: LinearOp) -> np.ndarray:
    """Which of the first Linear's weights its geometry allows (``LinearOp.support``, e.g. a
    convolution's windows) — else, for ops made without it, every weight: a plan never says which
    weights are zero (pruned)."""
    return np.ones(op.weight.shape, dtype=bool) if op.support is None else op.support


def gather_columns(support: np.ndarray) -> np.ndarray:
    """outputs × K: the inputs each output reads, in order, −1 past a row's last (K its longest)."""
    rows, cols = np.nonzero(support)
    counts = np.bincount(rows, minlength=support.shape[0])
    width = max(1, int(counts.max(initial=0)))
    columns = np.full((support.shape[0], width), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    columns[rows, np.arange(len(rows)) - starts[rows]] = cols
    return columns


@dataclass(frozen=True, eq=False)
class _Hybrid:
    """A later Linear's layout: its input periodic in ``period``, ``rows`` = pow2(outputs), baby steps."""

    period: int
    rows: int
    baby: int

    @property
    def giants(self) -> range:
        return range(0, self.rows, self.baby)

    @property
    def fold(self) -> list[int]:
        return doubling_steps(self.period // self.rows, self.rows)

    @property
    def steps(self) -> set[int]:
        return {*range(1, min(self.baby, self.rows)), *(g for g in self.giants if g), *self.fold}


@dataclass(frozen=True, eq=False)
class GatherPlan:
    """The gather layout for a ring of ``ring_slots`` slots: the first layer's ``columns``
    (outputs × K, −1 none), its block p₀ and, per later Linear, the hybrid layout."""

    ring_slots: int
    columns: np.ndarray
    block: int
    hybrids: tuple[_Hybrid, ...]

    @classmethod
    def for_ops(cls, ops: list[Op], ring_slots: int) -> GatherPlan:
        linears = linear_ops(ops)
        columns = gather_columns(first_support(linears[0]))
        block, hybrids, period = next_pow2(len(columns)), [], next_pow2(len(columns))
        for linear in linears[1:]:
            rows = next_pow2(linear.weight.shape[0])
            period = max(period, rows, next_pow2(linear.weight.shape[1]))
            hybrids.append(_Hybrid(period, rows, max(1, int(np.ceil(np.sqrt(rows))))))
            period = rows  # y is periodic in pow2(outputs)
        return cls(int(ring_slots), columns, block, tuple(hybrids))

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops)

    @property
    def slots(self) -> int:
        """The fewest slots the layout needs (its ring must have exactly ``ring_slots``)."""
        return max(self.block, *(h.period for h in self.hybrids))

    @property
    def replicas(self) -> int:
        return max(1, self.ring_slots // self.block)

    @property
    def ciphertexts(self) -> int:
        """What the client sends: the K gathered vectors, ``replicas`` to a ciphertext."""
        return -(-self.columns.shape[1] // self.replicas)

    @property
    def steps(self) -> tuple[int, ...]:
        steps = set(doubling_steps(self.replicas, self.block))
        for hybrid in self.hybrids:
            steps |= hybrid.steps
        return tuple(sorted(steps))

    def as_dict(self) -> dict:
        """What ``/plan`` tells a client: the geometry (which inputs each output reads), no weight."""
        return {"layout": "gather", "ring_slots": self.ring_slots, "columns": self.columns.tolist(),
                "block": self.block, "hybrids": [[h.period, h.rows, h.baby] for h in self.hybrids],
                "weight_scale_bits": GATHER_WEIGHT_SCALE_BITS}

    @classmethod
    def from_dict(cls, raw: dict, inputs: int) -> GatherPlan:
        """The plan a host sent (``as_dict``), checked before the client packs anything by it:
        ``inputs`` is the first layer's input count (from the plan's structure)."""
        def pow2(value) -> bool:
            return isinstance(value, int) and value > 0 and value & (value - 1) == 0

        try:
            ring_slots, block, hybrids = raw["ring_slots"], raw["block"], [tuple(h) for h in raw["hybrids"]]
            if not (pow2(ring_slots) and 2 * ring_slots in MAX_MODULUS_BITS and pow2(block) and block <= ring_slots):
                raise ValueError("ring_slots and block must be powers of two of a secure ring")
            if any(len(h) != 3 or not (pow2(h[0]) and pow2(h[1]) and isinstance(h[2], int))
                   or not h[1] <= h[0] <= ring_slots or not 1 <= h[2] <= h[1] for h in hybrids):
                raise ValueError("each hybrid must be (period, rows: powers of two within the ring; baby ≤ rows)")
            if raw.get("weight_scale_bits") != GATHER_WEIGHT_SCALE_BITS:
                raise ValueError(f"weight_scale_bits must be {GATHER_WEIGHT_SCALE_BITS}")
            count = sum(len(row) for row in raw["columns"])
            if not raw["columns"] or count > MAX_GATHER_VALUES:
                raise ValueError(f"columns must hold 1 to {MAX_GATHER_VALUES} values")
            columns = np.asarray(raw["columns"], dtype=np.int64)
            if columns.ndim != 2 or len(columns) > block or columns.min() < -1 or columns.max() >= inputs:
                raise ValueError(f"columns must be a table of input indices in [-1, {inputs})")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise KdsecError(f"the host's gather plan is malformed: {str(exc).splitlines()[0][:120]}") from None
        return cls(ring_slots, columns, block, tuple(_Hybrid(*h) for h in hybrids))

    def encode_input(self, sample: np.ndarray) -> np.ndarray:
        """``ciphertexts`` × ring_slots: ciphertext c, block b holds u_{cR+b}[i] = x[column(i, cR+b)]."""
        flat = np.asarray(sample, dtype=np.float64).reshape(-1)
        outputs, width = self.columns.shape
        gathered = np.where(self.columns >= 0, flat[np.maximum(self.columns, 0)], 0.0)  # outputs × K
        vectors = np.zeros((self.ciphertexts * self.replicas, self.block))
        vectors[:width, :outputs] = gathered.T
        return vectors.reshape(self.ciphertexts, self.replicas * self.block)[:, : self.ring_slots]

    def output_slots(self, ops: list[Op]) -> np.ndarray:
        return np.arange(linear_ops(ops)[-1].weight.shape[0])


def gather_params(ops: list[Op], config: HEConfig) -> HEParams:
    """The paired chain at inputs and weights of 2^20 (one prime per x²) on the smallest ring that
    holds it and the layout's slots; a one-line ``ConfigError`` where none does."""
    if not alternates(model_structure(ops)):
        raise ConfigError("the gather layout needs a program that alternates Linear and x²")
    needed = GatherPlan.for_ops(ops, 1)
    if needed.columns.size > MAX_GATHER_VALUES:
        raise ConfigError(f"the gather layout would pack {needed.columns.size} values a sample, over "
                          f"{MAX_GATHER_VALUES}")
    rings = sorted(MAX_MODULUS_BITS) if config.poly_modulus_degree == "auto" else [int(config.poly_modulus_degree)]
    for ring in rings:
        params = plan_paired(len(ops) // 2, GATHER_WEIGHT_SCALE_BITS, config.integer_bits, ring,
                             min_input_bits=GATHER_INPUT_BITS)
        if params is not None and params.slots >= needed.slots:
            return params
    raise ConfigError(f"no ring allowed holds the gather layout ({needed.slots} slots, {len(ops) // 2} x² on "
                      "60-bit primes)")


class GatherServer:
    """Encrypted-input host, single-sample gather path (``GatherPlan``): the weights encoded once,
    at the level where each layer uses them."""

    def __init__(self, public: PublicContext, ops: list[Op], plan: GatherPlan | None = None) -> None:
        params = public.params
        if params.weight_scale_bits != GATHER_WEIGHT_SCALE_BITS:
            raise KdsecError(f"the gather layout needs the paired chain at weight_scale_bits "
                             f"{GATHER_WEIGHT_SCALE_BITS}")
        self.public, self.ops = public, ops
        self.plan = plan or GatherPlan.for_ops(ops, params.slots)
        if self.plan.ring_slots != params.slots or self.plan.slots > params.slots:
            raise KdsecError(f"the gather plan is laid out for {self.plan.ring_slots} slots (it needs "
                             f"{self.plan.slots}), the context has {params.slots}")
        self.weight_scale = float(2**GATHER_WEIGHT_SCALE_BITS)
        self.linear_scale = float(2 ** (params.scale_bits + GATHER_WEIGHT_SCALE_BITS))  # Δ·2^w
        linears = linear_ops(ops)
        self.first, self.first_bias = self._first(linears[0])
        self.layers = [self._hybrid(linear, hybrid, level) for level, (linear, hybrid)
                       in enumerate(zip(linears[1:], self.plan.hybrids))]

    def _encode(self, vector: np.ndarray, parms_id):
        """None for a vector that encodes to zero (SEAL refuses a product with it)."""
        if np.abs(vector).max(initial=0.0) * self.weight_scale < 0.5:
            return None
        return self.public.encode(vector, parms_id, self.weight_scale)

    def _first(self, op: LinearOp) -> tuple[list, np.ndarray]:
        plan, slots = self.plan, self.plan.ring_slots
        columns = plan.columns
        if columns.shape[0] != op.weight.shape[0] or columns.max(initial=-1) >= op.weight.shape[1]:
            raise KdsecError("the gather plan does not match the first layer's shape")
        weights = np.where(columns >= 0, op.weight[np.arange(len(columns))[:, None], np.maximum(columns, 0)], 0.0)
        stacked = np.zeros((plan.ciphertexts * plan.replicas, plan.block))
        stacked[: columns.shape[1], : len(columns)] = weights.T
        top = self.public.context.first_parms_id()
        plains = [self._encode(row, top) for row in stacked.reshape(plan.ciphertexts, -1)[:, :slots]]
        bias = np.zeros(plan.block)
        bias[: len(op.bias)] = op.bias
        return plains, np.tile(bias, slots // plan.block)

    def _hybrid(self, op: LinearOp, hybrid: _Hybrid, level: int):
        """{giant step: [(baby step, the extended diagonal pre-rotated by −giant)]}, and the bias."""
        slots, (out_dim, in_dim) = self.plan.ring_slots, op.weight.shape
        padded = np.zeros((hybrid.rows, hybrid.period))
        padded[:out_dim, :in_dim] = op.weight
        j = np.arange(hybrid.period)
        parms_id = self.public.parms_id_at(level)
        groups: dict[int, list] = {}
        for k in range(hybrid.rows):
            diagonal = np.tile(padded[j % hybrid.rows, (j + k) % hybrid.period], slots // hybrid.period)
            giant = k - k % hybrid.baby
            plain = self._encode(np.roll(diagonal, giant), parms_id)
            if plain is not None:
                groups.setdefault(giant, []).append((k - giant, plain))
        bias = np.zeros(hybrid.rows)
        bias[:out_dim] = op.bias
        return groups, np.tile(bias, slots // hybrid.rows)

    @staticmethod
    def encoded_bytes(ops: list[Op], params: HEParams) -> int:
        """Memory the encoded weights take per session (shapes only): the first layer's K vectors
        and every later layer's pow2(outputs) diagonals, over the primes left at their level."""
        primes, slots = len(params.coeff_mod_bit_sizes) - 1, params.slots
        plan = GatherPlan.for_ops(ops, slots)
        count = [plan.ciphertexts] + [h.rows for h in plan.hybrids]
        return sum(n * params.poly_modulus_degree * (primes - max(0, level - 1)) * 8 for level, n in enumerate(count))

    def _rescale(self, ciphertext):
        self.public.evaluator.rescale_to_next_inplace(ciphertext)
        ciphertext.scale = self.linear_scale
        return ciphertext

    def infer(self, ciphertexts: list) -> list:
        plan, public = self.plan, self.public
        if len(ciphertexts) != plan.ciphertexts:
            raise KdsecError(f"expected {plan.ciphertexts} ciphertexts (the gathered input), got {len(ciphertexts)}")
        value = None
        for ciphertext, plain in zip(ciphertexts, self.first):
            if plain is None:
                continue
            term = public.multiply_encoded(ciphertext, plain)
            value = term if value is None else public.add_inplace(value, term)
        if value is None:
            raise KdsecError("every weight of the first layer is zero")
        value = public.add_plain(public.rotate_and_sum(value, doubling_steps(plan.replicas, plan.block)),
                                 self.first_bias)
        for (groups, bias), hybrid in zip(self.layers, plan.hybrids):
            value = public.square(value, rescale=False)  # relinearized, not rescaled: (Δ·2^w)²
            # each giant's partial sum, (Δ·2^w)²·2^w, rescaled by a (scale + 2w)-bit prime to Δ·2^w
            # before its (then cheaper) rotation
            total = baby_giant_sum(public, value, groups, self._rescale)
            if total is None:
                raise KdsecError("every weight of a layer is zero")
            value = public.add_plain(public.rotate_and_sum(total, hybrid.fold), bias)
        return [value]
