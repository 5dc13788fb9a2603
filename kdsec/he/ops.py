"""The operations every HE mode evaluates, and the layout helpers they share — without torch, so
that the batched path's host processes start in a fraction of a second (``program`` lowers a
torch model to these; a host process imports only this, ``residue``, ``batched`` and ``seal``).

``LinearOp`` (float64 weight and bias) and ``SquareOp`` (x²); ``plaintext_forward``, the
float64 reference decrypted logits are compared with; ``model_structure``, what a host may know
of a model (shapes, never weights); powers of two, rotation-step ladders, CKKS parameters from a
layout's multiplicative depth (``he_params``, ``batched_params``), samples in ciphertext-sized chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdsec.config import HEConfig
from kdsec.he.params import MAX_MODULUS_BITS, HEParams, plan_paired, plan_params


@dataclass(frozen=True, eq=False)
class LinearOp:
    weight: np.ndarray  # out × in
    bias: np.ndarray
    # The first op only: which weights the layers' geometry lets be non-zero (a convolution's
    # windows), whatever their values: what a client may learn (``gather``), never which are pruned.
    support: np.ndarray | None = None


@dataclass(frozen=True)
class SquareOp:
    pass


Op = LinearOp | SquareOp


def plaintext_forward(ops: list[Op], inputs: np.ndarray) -> np.ndarray:
    """The same arithmetic in float64: the reference the decrypted logits must agree with."""
    values = inputs.reshape(len(inputs), -1).astype(np.float64)
    for op in ops:
        values = values @ op.weight.T + op.bias if isinstance(op, LinearOp) else values * values
    return values


def model_structure(ops: list[Op]) -> list:
    """Layer kinds and shapes: what a host may know of a model (never a weight)."""
    return [["linear", *op.weight.shape] if isinstance(op, LinearOp) else ["square"] for op in ops]


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def doubling_steps(n: int, stride: int = 1, sign: int = 1) -> list[int]:
    """Rotation steps that sum (or spread) a window of pow2(n) slots: stride·1, stride·2, ..."""
    return [sign * stride * (1 << k) for k in range(next_pow2(n).bit_length() - 1)]


def linear_ops(ops: list[Op]) -> list[LinearOp]:
    return [op for op in ops if isinstance(op, LinearOp)]


def he_params(config: HEConfig, depth: int, min_slots: int, unrescaled_last: bool = False) -> HEParams:
    return plan_params(depth, config.scale_bits, config.integer_bits, config.poly_modulus_degree, min_slots,
                       unrescaled_last)


def alternates(structure: list) -> bool:
    """Whether a program (``model_structure``) is Linear (x² Linear)* with at least one x²."""
    kinds = [step[0] for step in structure]
    return (len(kinds) >= 3 and len(kinds) % 2 == 1 and all(kind == "linear" for kind in kinds[::2])
            and all(kind == "square" for kind in kinds[1::2]))


def batched_params(structure: list, config: HEConfig) -> HEParams:
    """The batched path's parameters for a program of ``structure`` (``model_structure``): the
    paired chain where the program alternates and ``config.batched_chain`` asks for it, else the
    classic chain with the last Linear unrescaled where that saves a prime."""
    if config.batched_chain == "paired" and alternates(structure):
        paired = plan_paired(len(structure) // 2, config.weight_scale_bits, config.integer_bits,
                             config.poly_modulus_degree)
        if paired is not None:
            return paired
    return plan_params(len(structure), config.scale_bits, config.integer_bits, config.poly_modulus_degree, 1,
                       unrescaled_last=True)


def largest_ring(config: HEConfig) -> int:
    """The largest poly_modulus_degree ``config`` allows (the one it names, or the largest secure one)."""
    return max(MAX_MODULUS_BITS) if config.poly_modulus_degree == "auto" else int(config.poly_modulus_degree)


def sample_chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def baby_giant_sum(public, value, groups: dict, before_rotation=None):
    """Σ over giant steps g of rot(Σ_j plain ⊙ rot(value, j), g): ``groups`` maps each giant step to
    its (baby step j, plaintext pre-rotated by −g) terms, so the babies are rotated once each and
    every giant once. ``before_rotation`` (e.g. a rescale) is applied to each giant's partial sum
    before its rotation. None where ``groups`` is empty."""
    babies = {0: value}
    for baby in sorted({j for terms in groups.values() for j, _ in terms} - {0}):
        babies[baby] = public.rotate(value, baby)
    total = None
    for giant, terms in groups.items():
        part = None
        for baby, plain in terms:
            term = public.multiply_encoded(babies[baby], plain)
            part = term if part is None else public.add_inplace(part, term)
        if before_rotation is not None:
            part = before_rotation(part)
        if giant:
            part = public.rotate(part, giant)
        total = part if total is None else public.add_inplace(total, part)
    return total
