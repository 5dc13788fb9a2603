"""Plaintext-weight Linear layers on CKKS ciphertexts as float64 matrix products over their residues.

A CKKS ciphertext (always in NTT form) is ``size`` polynomials over the primes q_i of its level,
N words each. Multiplying it by a plaintext scalar w encoded at scale s multiplies every word by
the integer c = round(w·s), modulo its prime — exactly what SEAL's ``multiply_plain`` does with a
constant plaintext. So a whole layer, out_k = Σ_j c_kj · in_j, is per prime one integer matrix
product: (out × in) weights times (in × size·N) residues, taken modulo q_i.

Here that product runs in float64 BLAS, exactly: each residue is split into limbs of b bits so
that every dot product stays below 2^52 (b = 52 − bits of the largest row's Σ|c|), and
the limbs' sums are put back together modulo q_i in int64 (Horner steps with 2^L ≡ 2^L − q_i;
two conditional subtractions end it for 60-bit primes, a float quotient corrected by one for
others). The result equals SEAL's weight-by-weight loop word for word, at a fraction of the cost:
SEAL encodes, multiplies and adds one ciphertext per weight (~N·L·3 words each, one pass per
weight), BLAS streams the residues once per block of outputs. Sparse layers (a convolution
lowered to a matrix) are cut into row groups that share input columns, each one dense block
product; coefficients go in cache-sized chunks.

Ciphertext memory is read and written in place (``residues``: the bindings expose no pointer, so
the C++ object is read through its pybind11 instance, every field checked against the bindings'
accessors first; another layout raises ``LayoutError`` and the caller falls back to SEAL's loop).
Outputs are ciphertexts of the right level, size and NTT form — consumed inputs, or negated
copies of one — overwritten, so SEAL's own checks keep holding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

FLOAT_EXACT_BITS = 52  # |integers| below 2^52 (one bit of margin under float64's 2^53) add exactly
MIN_LIMB_BITS = 4  # narrower limbs cost more products than SEAL's loop saves: refused
GROUP_ROWS = 32  # output rows per block of a sparse layer
COLUMN_BYTES = 4 << 20  # bytes of the widest array (inputs or outputs × words) per coefficient chunk: in cache


class LayoutError(RuntimeError):
    """SEAL's in-memory ciphertext layout is not the one this module reads (another SEAL build)."""


# SEAL 4.1's Ciphertext, in 8-byte words from the object's start (read from TenSEAL 0.3.18's build
# and checked on every ciphertext before its memory is touched): parms_id (4 words), is_ntt_form,
# size, poly_modulus_degree, coeff_modulus_size, scale (double), correction_factor, then the
# DynArray of coefficients: its memory pool (2 words), capacity, size, data pointer.
_WORDS = 15
_SIZE, _DEGREE, _PRIMES, _SCALE, _COUNT, _POINTER = 5, 6, 7, 8, 13, 14


def residues(ciphertext) -> np.ndarray:
    """A writeable (size, primes, N) uint64 view of ``ciphertext``'s coefficients. The view keeps
    the ciphertext alive; a SEAL operation that reallocates it (one that grows its size)
    invalidates the view. The bindings return no pointer (``Ciphertext.data()`` is the first
    word's value), so the C++ object is read through the pybind11 instance (its value pointer
    follows the Python object header) and every field is checked against the bindings' own
    accessors before the coefficients are touched: a SEAL with another layout raises
    ``LayoutError``, never reads elsewhere."""
    if type(ciphertext) is not seal.Ciphertext:
        raise LayoutError(f"not a SEAL ciphertext: {type(ciphertext).__name__}")
    size, degree, primes = ciphertext.size(), ciphertext.poly_modulus_degree(), ciphertext.coeff_modulus_size()
    count = size * degree * primes
    address = ctypes.c_void_p.from_address(id(ciphertext) + object.__basicsize__).value
    if not address:
        raise LayoutError("no C++ object behind this ciphertext")
    words = (ctypes.c_uint64 * _WORDS).from_address(address)
    scale = ctypes.c_double.from_address(address + 8 * _SCALE).value
    if (words[_SIZE], words[_DEGREE], words[_PRIMES], words[_COUNT]) != (size, degree, primes, count) \
            or scale != ciphertext.scale or not words[_POINTER]:
        raise LayoutError("SEAL's ciphertext layout is not the one this module reads")
    buffer = (ctypes.c_uint64 * count).from_address(words[_POINTER])
    buffer._owner = ciphertext  # the memory lives as long as the view does
    view = np.ctypeslib.as_array(buffer).reshape(size, primes, degree)
    if any(int(view[k, 0, 0]) != ciphertext.data(k) for k in range(size)):
        raise LayoutError("SEAL's ciphertext layout is not the one this module reads")
    return view


def moduli(context, parms_id) -> list[int]:
    """The primes of the level ``parms_id``."""
    return [modulus.value() for modulus in context.get_context_data(parms_id).parms().coeff_modulus()]


@dataclass(frozen=True)
class _Block:
    rows: np.ndarray  # output rows (into the layer's kept rows)
    parts: tuple[tuple[np.ndarray, np.ndarray], ...]  # (input columns, float64 integer weights rows × columns)


class ResidueLinear:
    """``weight`` (out × in, float) encoded at ``scale`` as integers; applied to ciphertexts of one
    level by ``apply``. Rows or columns that are all zero never enter a product."""

    def __init__(self, weight: np.ndarray, scale: float) -> None:
        integers = np.round(np.asarray(weight, dtype=np.float64) * scale)
        if not np.isfinite(integers).all():
            raise ValueError("the residue path needs finite weights")
        self.integers = integers
        self.out_dim, self.in_dim = integers.shape
        nonzero = integers != 0
        # |Σ_j c_kj · limb_j| ≤ (Σ_j |c_kj|) · 2^b: the largest row's L1 norm bounds every dot
        # product (tighter than max |c| × non-zeros per row: trained rows are mostly small weights).
        # Where halving a block's columns buys a limb fewer (two halves, each below 2^52, add
        # exactly below 2^53), its product runs in two halves.
        blocks = self._blocks(nonzero)
        whole = _bits(max((_norm(part[1]) for block in blocks for part in block.parts), default=1.0))
        halves = _bits(max((_norm(weight) for block in blocks for _, weight in _halves(block)), default=1.0))
        if blocks and _limbs(FLOAT_EXACT_BITS - halves) < _limbs(FLOAT_EXACT_BITS - whole):
            blocks = [_Block(block.rows, _halves(block)) for block in blocks]
            self.limb_bits, self.sum_bits = FLOAT_EXACT_BITS - halves, FLOAT_EXACT_BITS + 1
        else:
            self.limb_bits, self.sum_bits = FLOAT_EXACT_BITS - whole, FLOAT_EXACT_BITS
        self.blocks = blocks
        self._groups: dict[tuple[int, int], list[_Block]] = {}  # ``accumulate``'s blocks per column group

    @property
    def usable(self) -> bool:
        return self.limb_bits >= MIN_LIMB_BITS

    def _blocks(self, nonzero: np.ndarray) -> list[_Block]:
        """Row groups over the columns any of their rows reads. Dense layers: one block. Sparse
        ones (a convolution): rows ordered by their first non-zero column, so that the maps of
        one output position (the same input window) share a block, GROUP_ROWS rows a block."""
        rows = np.flatnonzero(nonzero.any(axis=1))
        if len(rows) == 0:
            return []
        density = nonzero[rows].sum() / max(1, len(rows) * max(1, nonzero.any(axis=0).sum()))
        if density > 0.5:
            cols = np.flatnonzero(nonzero[rows].any(axis=0))
            return [_Block(rows, ((cols, self.integers[np.ix_(rows, cols)]),))]
        order = rows[np.argsort(nonzero[rows].argmax(axis=1), kind="stable")]
        blocks = []
        for start in range(0, len(order), GROUP_ROWS):
            group = np.sort(order[start:start + GROUP_ROWS])
            cols = np.flatnonzero(nonzero[group].any(axis=0))
            blocks.append(_Block(group, ((cols, self.integers[np.ix_(group, cols)]),)))
        return blocks

    def apply(self, evaluator, context, inputs: list, weight_scale: float,
              consume: bool = False) -> dict[int, object]:
        """Σ_j c_kj · inputs[j] for every row with a non-zero weight, as ciphertexts (not rescaled,
        not relinearized) at scale inputs' scale × ``weight_scale``. ``inputs``: one ciphertext per
        column, all of one level and size. With ``consume`` the inputs' memory is reused for
        outputs (each chunk of words is read before any output is written there): the inputs are
        garbage afterwards. Returns {row: ciphertext}."""
        if not self.blocks:  # every weight is zero
            return {}
        self._check(inputs)
        views = [residues(ct) for ct in inputs]  # every view is made (and checked) before anything is changed
        reusable = list(inputs) if consume else []
        outputs = self._outputs(evaluator, inputs[0], weight_scale, reusable)
        self._products(context, inputs[0], views, self.blocks, outputs, add=False)
        return outputs

    def accumulate(self, evaluator, context, inputs: list, first: int, weight_scale: float,
                   outputs: dict[int, object] | None) -> dict[int, object]:
        """The share of columns [first, first + len(inputs)) — a contiguous group of the layer's
        inputs, as a client sends them a message at a time — added into ``outputs`` (None for the
        first group: made here). Every share is reduced modulo its prime before it is added, so
        the sum over all groups is exactly what ``apply`` returns for all the inputs at once."""
        if not self.blocks:
            return {}
        self._check(inputs)
        key = (first, len(inputs))
        if key not in self._groups:  # the blocks this group reaches, each cut to the group's columns
            groups = []
            for block in self.blocks:
                parts = tuple((cols[a:b] - first, weight[:, a:b]) for cols, weight in block.parts
                              for a, b in [np.searchsorted(cols, [first, first + len(inputs)])] if b > a)
                if parts:
                    groups.append(_Block(block.rows, parts))
            self._groups[key] = groups
        views = [residues(ct) for ct in inputs]  # checked before anything is made or changed
        if outputs:
            out, first_input = next(iter(outputs.values())), inputs[0]
            if out.parms_id() != first_input.parms_id() or out.size() != first_input.size() \
                    or out.scale != first_input.scale * weight_scale:
                raise ValueError("every group must be at the level, size and scale of the first")
        if outputs is None:
            outputs = self._outputs(evaluator, inputs[0], weight_scale, [])
            for out in outputs.values():  # rows a group never reaches stay zero
                residues(out)[:] = 0
        if self._groups[key]:
            self._products(context, inputs[0], views, self._groups[key], outputs, add=True)
        return outputs

    @staticmethod
    def _check(inputs: list) -> None:
        first = inputs[0]
        parms_id, size, scale = first.parms_id(), first.size(), first.scale
        if any(ct.parms_id() != parms_id or ct.size() != size or ct.scale != scale for ct in inputs):
            raise ValueError("the residue path needs every input at one level, size and scale")

    def _outputs(self, evaluator, template, weight_scale: float, reusable: list) -> dict[int, object]:
        """A ciphertext per row at ``template``'s level and size (its memory from ``reusable``
        where there is some), at scale template's × ``weight_scale``; contents to be overwritten."""
        outputs: dict[int, object] = {}
        scale = template.scale
        for row in np.concatenate([block.rows for block in self.blocks]):  # block order
            if reusable:
                out = reusable.pop()
            else:
                out = seal.Ciphertext()
                evaluator.negate(template, out)  # right level, size and NTT form; overwritten below
            outputs[int(row)] = out
        for out in outputs.values():
            out.scale = scale * weight_scale
        return outputs

    def _products(self, context, first, views: list, blocks: list[_Block], outputs: dict[int, object],
                  add: bool) -> None:
        """Each output row's Σ over ``blocks`` (columns index ``views``, the inputs' residues; ``first``
        one of the inputs) written into ``outputs`` (``add``: added modulo each prime to what is there)."""
        primes = moduli(context, first.parms_id())
        n, size = first.poly_modulus_degree(), first.size()
        inputs = views
        out_views = [residues(outputs[int(row)]) for block in blocks for row in block.rows]  # block order
        rows = len(out_views)
        bounds = np.cumsum([0] + [len(block.rows) for block in blocks])
        step = max(64, min(n, COLUMN_BYTES // (8 * size * max(len(inputs), rows)) // 64 * 64))
        for index, prime in enumerate(primes):
            # narrower limbs where δ = 2^L − prime is wide, so that _combine's steps stay in int64
            bits = min(self.limb_bits, 60 - ((1 << prime.bit_length()) - prime).bit_length())
            limbs = -(-prime.bit_length() // bits)
            wide = np.uint64(prime)
            for start in range(0, n, step):
                stop = min(n, start + step)
                words = np.stack([view[:, index, start:stop] for view in views]).reshape(len(inputs), -1).view(np.int64)
                sums = []
                for limb in range(limbs):
                    part = _limb(words, limb, bits)
                    exact = np.empty((rows, part.shape[1]))
                    for block, low, high in zip(blocks, bounds[:-1], bounds[1:]):  # no block has an empty part
                        (cols, weight), *rest = block.parts
                        np.matmul(weight, part[cols], out=exact[low:high])  # |sums| < 2^52: exact
                        for cols, weight in rest:  # the second half: the sum stays below 2^53, exact
                            exact[low:high] += weight @ part[cols]
                    sums.append(exact)
                total = _combine(sums, bits, prime, self.sum_bits).reshape(rows, size, stop - start)
                for slot, view in enumerate(out_views):
                    if add:  # both in [0, prime): the sum is below 2^61, one subtraction reduces it
                        target = view[:, index, start:stop]
                        target += total[slot].view(np.uint64)
                        np.subtract(target, wide, out=target, where=target >= wide)
                    else:
                        view[:, index, start:stop] = total[slot]


def _norm(weight: np.ndarray) -> float:
    """The largest row's L1 norm of a block of integer weights."""
    return float(np.abs(weight).sum(axis=1).max(initial=1.0))


def _bits(norm: float) -> int:
    return int(min(norm, 2.0**60)).bit_length()


def _limbs(bits: int) -> int:
    """Limbs a 60-bit prime takes at ``bits`` per limb (an unusable width counts as many)."""
    return -(-60 // bits) if bits >= MIN_LIMB_BITS else 1 << 30


def _halves(block: _Block) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """A one-part block's columns in two halves (a block already halved is returned as it is)."""
    if len(block.parts) != 1 or len(block.parts[0][0]) < 2:
        return block.parts
    cols, weight = block.parts[0]
    middle = len(cols) // 2
    return ((cols[:middle], weight[:, :middle]), (cols[middle:], weight[:, middle:]))


def _limb(words: np.ndarray, limb: int, bits: int) -> np.ndarray:
    """Limb ``limb`` (``bits`` wide) of every word (int64, < 2^62), as float64."""
    part = words >> (limb * bits) if limb else words.copy()
    part &= (1 << bits) - 1
    return part.astype(np.float64)


def _combine(sums: list[np.ndarray], bits: int, prime: int, sum_bits: int = FLOAT_EXACT_BITS) -> np.ndarray:
    """Σ_l sums[l] · 2^(l·bits) mod prime, in [0, prime) as int64; each ``sums[l]`` float64
    integers below 2^sum_bits in magnitude. Horner from the top limb in int64: with L the prime's bit
    length and δ = 2^L − prime, v·2^bits = h·2^L + r·2^bits ≡ h·δ + r·2^bits (h = v >> (L − bits),
    an arithmetic shift, so negative sums need no care); reduced only where the next step could
    leave int64, and at the end — by two conditional subtractions where the bounds allow (60-bit
    primes, two limbs), else through a float quotient."""
    length = prime.bit_length()
    delta = (1 << length) - prime
    exact_bound = 1 << sum_bits
    total = sums[-1].astype(np.int64)
    low, high = -exact_bound, exact_bound  # low < total < high
    for exact in reversed(sums[:-1]):
        if max(-low, high).bit_length() - length + bits + delta.bit_length() + 2 > 62:
            total = _reduce(total, prime)
            low, high = 0, prime
        shifted = max(-low, high) >> (length - bits)  # |h| ≤ this
        top = total >> (length - bits)
        total &= (1 << (length - bits)) - 1
        total <<= bits  # [0, 2^L)
        top *= delta
        total += top
        total += exact.astype(np.int64)
        low, high = -(shifted + 1) * delta - exact_bound, (1 << length) + (shifted + 1) * delta + exact_bound
    if low >= -prime and high <= 3 * prime:  # [−prime, 3·prime): no division needed
        np.add(total, prime, out=total, where=total < 0)
        np.subtract(total, prime, out=total, where=total >= prime)
        np.subtract(total, prime, out=total, where=total >= prime)
        return total
    return _reduce(total, prime)


def _reduce(values: np.ndarray, prime: int) -> np.ndarray:
    """``values`` (int64, |v| < 2^62) modulo ``prime``, in place, in [0, prime)."""
    quotient = values.astype(np.float64)
    quotient *= 1.0 / prime
    np.floor(quotient, out=quotient)
    values -= quotient.astype(np.int64) * prime  # the float quotient is the true one or one off
    np.add(values, prime, out=values, where=values < 0)
    np.subtract(values, prime, out=values, where=values >= prime)
    return values
