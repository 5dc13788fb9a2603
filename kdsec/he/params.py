"""CKKS parameters: the secure moduli per ring, how kdsec lays out a chain for a depth
(``plan_params``) or a paired chain (``plan_paired``), and SEAL's Galois elements."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kdsec.errors import ConfigError

# Largest total coefficient-modulus bits per ring degree at 128-bit security (HE standard, as SEAL enforces).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
BUNDLE_MAGIC = b"KDSECHE1"
PUBLIC_ROLES = ["public_key", "relin_keys", "galois_keys"]
MAX_HEADER_BYTES = 1 << 20
MAX_BLOBS = 1 << 16
MAX_PRIME_BITS = 60  # SEAL's largest prime
MIN_LAST_SCALE_BITS = 12  # an unrescaled last Linear's weights keep at least this precision
MIN_PAIRED_INPUT_BITS = 26  # a paired chain's input precision: fresh noise ~2^-16 of a value at 2^26
MIN_INTEGER_BITS = 4  # HEConfig.integer_bits' lower bound: headroom every chain leaves for |values|
MAX_ROTATIONS = 128  # a plan needs a few doubling ladders: ~2·log2(width) steps
# SEAL's serialization header (verified against PublicKey/Ciphertext.save): magic 0xA15E, header
# size 16, version major/minor, compression mode, reserved, then the whole object's size.
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
COMPR_NONE, COMPR_ZSTD = 0, 2  # what SEAL saves; zlib (1) is refused: nothing of ours writes it
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK_MAX = 128 * 1024  # a zstd block never inflates past this
ZSTD_BLOCK_MIN = 4096  # each block counts at least this much, so a stream of empty blocks cannot cost CPU time
# What a blob's zstd block headers may claim over its role's exact size: SEAL's own streams claim
# at most 1.7× (rings 8192–32768, primes 25–60 bits); 3× + 1 MiB leaves room and caps a bomb.
INFLATE_FACTOR, INFLATE_SLACK = 3, 1 << 20


@dataclass(frozen=True)
class HEParams:
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    # Set: the program's last Linear is not rescaled; its weights are encoded at 2^last_scale_bits
    # and its sums stay in the (60-bit) decryption prime: one prime fewer on every ciphertext.
    last_scale_bits: int | None = None
    # Set: the batched path's *paired* chain (``plan_paired``): every Linear's weights are encoded at
    # 2^weight_scale_bits; each x² and the Linear after it take Δ·Δw to (Δ·Δw)²·Δw, rescaled once,
    # by a prime of scale_bits + 2·weight_scale_bits bits, back to Δ·Δw. One prime per x².
    weight_scale_bits: int | None = None

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescales available: every modulus but the first (decryption) and last (key switching)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def program_depth(self) -> int:
        """Operations (Linear or x²) a program may chain: one per rescale, plus the unrescaled last Linear
        (paired: Linear, x² alternating, one x² per rescale, a Linear first and last)."""
        if self.weight_scale_bits is not None:
            return 2 * self.depth + 1
        return self.depth + (self.last_scale_bits is not None)

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def as_dict(self) -> dict:
        extra = {key: getattr(self, key) for key in ("last_scale_bits", "weight_scale_bits")
                 if getattr(self, key) is not None}
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "scale_bits": self.scale_bits, **extra}

    @classmethod
    def from_dict(cls, raw: dict) -> HEParams:
        return cls(raw["poly_modulus_degree"], tuple(raw["coeff_mod_bit_sizes"]), raw["scale_bits"],
                   raw.get("last_scale_bits"), raw.get("weight_scale_bits"))

    @property
    def key_ciphertext_bytes(self) -> int:
        """One key-level ciphertext in memory: two polynomials over every prime, 8 bytes a coefficient.
        A public key is one; a relinearization or rotation key is one per data prime."""
        return 2 * self.poly_modulus_degree * len(self.coeff_mod_bit_sizes) * 8

    @property
    def ciphertext_bytes(self) -> int:
        """One fresh ciphertext in memory: two polynomials over every data prime, 8 bytes a coefficient
        (an upper bound: one at a lower level has fewer primes)."""
        return 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8

    def resident_bytes(self, rotation_keys: int) -> int:
        """Estimated memory a host holds for a context: the keys uncompressed (the public key twice:
        the encryptor keeps a copy; one relinearization key) plus SEAL's per-level precomputed
        tables, measured at 70–88 bytes per coefficient per prime per level (rings 8192–32768) and
        counted as 96. Estimated vs measured RSS per open session: the test student (he_mlp 64→16→10)
        15.0 vs 14.8 MiB batched, 73.5 vs 72.9 single; a deeper one (N=16384) 56 vs 51, 396 vs 385."""
        primes = len(self.coeff_mod_bit_sizes)
        keys = self.key_ciphertext_bytes * (2 + (primes - 1) * (1 + rotation_keys))
        return keys + 96 * self.poly_modulus_degree * primes * (primes + 1) // 2


def plan_params(depth: int, scale_bits: int, integer_bits: int, poly_modulus_degree: int | str = "auto",
                min_slots: int = 1, unrescaled_last: bool = False) -> HEParams:
    """The smallest secure ring for ``depth`` rescales at ``scale_bits`` precision: moduli
    ``[scale+integer, scale × depth, scale+integer]``, checked against the 128-bit bound.

    ``unrescaled_last`` (a program whose last op is a Linear, depth ≥ 2): ``[60, scale × (depth
    − 1), 60]`` with the last Linear's weights at 2^(60 − scale − integer − 1), so that its
    sums, |value| < 2^integer, fit the 60-bit decryption prime without a rescale. Every
    ciphertext then carries one prime fewer (the batched path: ~30 % less host time). Where
    that leaves the last weights under 2^-MIN_LAST_SCALE_BITS precision, the usual chain."""
    outer = scale_bits + integer_bits
    bits = (outer, *([scale_bits] * depth), outer)
    last = MAX_PRIME_BITS - scale_bits - integer_bits - 1
    shorter = (MAX_PRIME_BITS, *([scale_bits] * (depth - 1)), MAX_PRIME_BITS)
    rings = sorted(MAX_MODULUS_BITS) if poly_modulus_degree == "auto" else [int(poly_modulus_degree)]
    for ring in rings:
        if ring // 2 >= min_slots and sum(bits) <= MAX_MODULUS_BITS[ring]:
            # the shorter chain only on the ring the usual one needs (a larger ring costs 2×)
            fits = sum(shorter) <= MAX_MODULUS_BITS[ring]
            if unrescaled_last and depth >= 2 and last >= MIN_LAST_SCALE_BITS and fits:
                return HEParams(ring, shorter, scale_bits, last)
            return HEParams(ring, bits, scale_bits)
    ring = rings[-1]
    if ring // 2 < min_slots:
        hint = ("no secure ring has that many: use a narrower student (student.hidden, student.pool) or "
                "encrypt.he.latency_samples: 0 to skip the single-sample path" if poly_modulus_degree == "auto"
                else "set encrypt.he.poly_modulus_degree: auto or use a smaller student")
        raise ConfigError(f"this layout needs {min_slots} slots but poly_modulus_degree {ring} has {ring // 2}; {hint}")
    fitting = [n for n, cap in sorted(MAX_MODULUS_BITS.items()) if sum(bits) <= cap and n // 2 >= min_slots]
    hint = (f"set encrypt.he.poly_modulus_degree to {fitting[0]} (or auto)" if fitting
            else "no secure ring is large enough: use a shallower student or lower encrypt.he.scale_bits")
    raise ConfigError(f"the student needs multiplicative depth {depth}, i.e. {sum(bits)} modulus bits, over the "
                      f"128-bit security bound of {MAX_MODULUS_BITS[ring]} bits for poly_modulus_degree {ring}; {hint}")


def plan_paired(squares: int, weight_scale_bits: int, integer_bits: int, poly_modulus_degree: int | str = "auto",
                min_input_bits: int = MIN_PAIRED_INPUT_BITS) -> HEParams | None:
    """The batched path's paired chain for a program Linear (x² Linear) × ``squares``: ``squares``
    + 2 primes of P bits (the decryption prime, one per x², the key-switching prime), P the
    largest that fits the ring (at most 60). Inputs are encoded at Δ = 2^(P − 2·w), weights at
    2^w (w = ``weight_scale_bits``): the first Linear takes Δ to Δ·2^w; each x² and the Linear
    after it take Δ·2^w to (Δ·2^w)²·2^w, whose rescale by a P-bit prime gives Δ·2^w back. The
    last Linear's sums end in the decryption prime (|values| < 2^(w − 1)). The smallest ring
    where Δ keeps ``min_input_bits`` (MIN_PAIRED_INPUT_BITS), or None (no ring does, or
    the integer part would not fit)."""
    if squares < 1 or weight_scale_bits - 1 < integer_bits:
        return None
    rings = sorted(MAX_MODULUS_BITS) if poly_modulus_degree == "auto" else [int(poly_modulus_degree)]
    for ring in rings:
        prime = min(MAX_PRIME_BITS, MAX_MODULUS_BITS[ring] // (squares + 2))
        scale = prime - 2 * weight_scale_bits
        if scale >= min_input_bits:
            return HEParams(ring, (prime,) * (squares + 2), scale, None, weight_scale_bits)
    return None


def galois_element(step: int, n: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots (negative: right)."""
    slots = n // 2
    exponent = (slots - (-step)) % slots if step < 0 else step % slots
    return pow(3, exponent, 2 * n)


