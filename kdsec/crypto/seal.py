"""A thin typed layer over Microsoft SEAL's CKKS through TenSEAL's ``sealapi`` bindings.

TenSEAL's high-level vectors rescale after every product and expose no rotations. The HE
engine needs both lazy rescaling (one rescale per neuron, not one per weight: ~4× fewer NTTs)
and explicit rotations (the single-sample and encrypted-model layouts), so it drives SEAL
directly. SEAL objects serialize only to files (the bindings have no stream or bytes API):
``dump``/``load`` go through a private 0700 temp folder (in memory where /dev/shm exists), one
fresh O_EXCL file per call, so threads never share a file.

Loading is where untrusted bytes meet SEAL, so a bundle header is a strict typed model (exact
keys, bounded counts and numbers) and every blob must be exactly one SEAL object whose inflated
size fits what its role can hold: SEAL ignores bytes after an object, and a compressed object
could otherwise make SEAL allocate what the stream claims (a 4 KiB blob, a 16-part ciphertext).

Roles: ``KeyHolder`` owns the secret key; ``PublicContext`` is everything a host may hold
(parameters, public key, relinearization and rotation keys) and is what travels.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tenseal.sealapi as seal
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from kdsec.errors import ConfigError, IntegrityError

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


# --- bundle headers, typed: anything else is refused before SEAL sees a byte -------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


BlobSize = Annotated[int, Field(ge=0, le=1 << 40)]
Bits = Annotated[int, Field(ge=20, le=60)]  # SEAL's primes are at most 60 bits; below 20 none fit a ring
Name = Annotated[str, StringConstraints(max_length=32)]
Dimension = Annotated[int, Field(ge=1, le=1 << 20)]


class _Bundle(_Strict):
    sizes: list[BlobSize] = Field(max_length=MAX_BLOBS)


class ParamsHeader(_Strict):
    poly_modulus_degree: int
    coeff_mod_bit_sizes: list[Bits] = Field(min_length=3, max_length=64)
    scale_bits: Bits
    last_scale_bits: Annotated[int, Field(ge=MIN_LAST_SCALE_BITS, le=MAX_PRIME_BITS)] | None = None
    weight_scale_bits: Annotated[int, Field(ge=MIN_LAST_SCALE_BITS, le=MAX_PRIME_BITS)] | None = None

    @model_validator(mode="after")
    def _secure_kdsec_chain(self) -> ParamsHeader:
        ring, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if ring not in MAX_MODULUS_BITS:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS)}")
        if sum(bits) > MAX_MODULUS_BITS[ring]:
            raise ValueError(f"{sum(bits)} modulus bits exceed the 128-bit security bound of "
                             f"{MAX_MODULUS_BITS[ring]} for poly_modulus_degree {ring}")
        if self.weight_scale_bits is not None:  # the paired chain plan_paired lays out
            weight = self.weight_scale_bits
            if self.last_scale_bits is not None or any(b != self.scale_bits + 2 * weight for b in bits[1:-1]):
                raise ValueError("a paired chain's middle primes have scale_bits + 2·weight_scale_bits bits, "
                                 "and it has no last_scale_bits")
            if self.scale_bits + weight + 1 + MIN_INTEGER_BITS > bits[0]:
                raise ValueError(f"scale_bits + weight_scale_bits must leave {1 + MIN_INTEGER_BITS} of the "
                                 "first prime's bits for the values")
            return self
        # The chain plan_params lays out; rescaling snaps back to 2^scale_bits, so any other breaks evaluation.
        if any(b != self.scale_bits for b in bits[1:-1]) or bits[0] < self.scale_bits:
            raise ValueError("the middle primes must have scale_bits bits and the first at least as many")
        # the unrescaled sums need room for a sign bit and MIN_INTEGER_BITS of integer part
        if self.last_scale_bits is not None and self.scale_bits + self.last_scale_bits + 1 + MIN_INTEGER_BITS > bits[0]:
            raise ValueError(f"scale_bits + last_scale_bits must leave {1 + MIN_INTEGER_BITS} of the first "
                             "prime's bits for the values")
        return self


class PublicContextHeader(_Bundle):
    kind: Literal["public-context"]
    params: ParamsHeader
    roles: list[Name] = Field(max_length=8)
    rotation_steps: list[int] = Field(max_length=MAX_ROTATIONS)

    @model_validator(mode="after")
    def _public_keys_only(self) -> PublicContextHeader:
        if self.roles not in (PUBLIC_ROLES[:2], PUBLIC_ROLES):
            raise ValueError(f"a kdsec public context holds a public key, relinearization keys and optionally "
                             f"rotation keys, nothing else (got {self.roles}; a secret key is never accepted)")
        if len(self.sizes) != len(self.roles):
            raise ValueError(f"{len(self.roles)} roles but {len(self.sizes)} blobs")
        if ("galois_keys" in self.roles) != bool(self.rotation_steps):
            raise ValueError("rotation keys come with their rotation_steps, and only with them")
        slots = self.params.poly_modulus_degree // 2
        if any(not 0 < abs(step) < slots for step in self.rotation_steps):
            raise ValueError(f"a rotation step is a nonzero slot offset under {slots} in magnitude")
        return self


class CiphertextsHeader(_Bundle):
    kind: Literal["ciphertexts"]


class EncryptedModelHeader(_Bundle):
    kind: Literal["encrypted-model"]
    structure: list[tuple[Literal["linear"], Dimension, Dimension] | tuple[Literal["square"]]] = Field(max_length=64)
    block: Dimension
    layout: list[Annotated[int, Field(ge=0, le=MAX_BLOBS)]] = Field(max_length=64)

    @model_validator(mode="after")
    def _layout_covers_the_blobs(self) -> EncryptedModelHeader:
        if sum(self.layout) != len(self.sizes):
            raise ValueError(f"the layout lists {sum(self.layout)} ciphertexts but the bundle has {len(self.sizes)}")
        return self


HEADERS: dict[str, type[_Bundle]] = {"public-context": PublicContextHeader, "ciphertexts": CiphertextsHeader,
                                     "encrypted-model": EncryptedModelHeader}


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part)[:40] for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def pack(header: dict, blobs: list[bytes]) -> bytes:
    """A length-prefixed container: magic, JSON header (with blob sizes), then the blobs."""
    head = json.dumps({**header, "sizes": [len(blob) for blob in blobs]}).encode()
    return BUNDLE_MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


def read_header(data: bytes, kind: str) -> tuple[dict, int]:
    """A bundle's header, validated by ``HEADERS[kind]`` (as plain JSON data), and where its blobs
    start; the blob sizes add up to the rest of ``data`` exactly."""
    start = len(BUNDLE_MAGIC) + 4
    if not data.startswith(BUNDLE_MAGIC) or len(data) < start:
        raise IntegrityError(f"not a kdsec HE {kind} (bad magic or truncated)")
    (length,) = struct.unpack(">I", data[len(BUNDLE_MAGIC):start])
    if length > MAX_HEADER_BYTES or start + length > len(data):
        raise IntegrityError(f"kdsec HE {kind}: header of {length} bytes is truncated or over {MAX_HEADER_BYTES}")
    try:
        header = HEADERS[kind].model_validate_json(data[start:start + length])
    except ValidationError as exc:
        raise IntegrityError(f"kdsec HE {kind} header: {_first_problem(exc)}") from None
    if start + length + sum(header.sizes) != len(data):
        raise IntegrityError(f"kdsec HE {kind} is truncated or has trailing bytes")
    return header.model_dump(mode="json"), start + length


def unpack(data: bytes, kind: str) -> tuple[dict, list[bytes]]:
    """The validated header and the blobs it sizes."""
    header, offset = read_header(data, kind)
    blobs = []
    for size in header["sizes"]:
        blobs.append(data[offset:offset + size])
        offset += size
    return header, blobs


# --- SEAL objects through private files --------------------------------------------------------


def _zstd_inflated_bound(stream: memoryview, limit: int) -> int | None:
    """An upper bound on what zstd frames inflate to, from their block headers alone (raw and RLE
    blocks state their size, a compressed block yields at most 128 KiB); stops once over ``limit``.
    None when the frames are malformed."""
    total = at = 0
    while at < len(stream) and total <= limit:
        if at + 5 > len(stream) or stream[at:at + 4] != ZSTD_MAGIC:
            return None
        descriptor = stream[at + 4]
        single_segment = descriptor >> 5 & 1
        content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
        at += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes
        last = 0
        while not last and total <= limit:
            if at + 3 > len(stream):
                return None
            block = int.from_bytes(stream[at:at + 3], "little")
            last, kind, size = block & 1, block >> 1 & 3, block >> 3
            if kind == 3:
                return None
            total += max(ZSTD_BLOCK_MIN, ZSTD_BLOCK_MAX if kind == 2 else size)
            at += 3 + (1 if kind == 1 else size)
        at += 4 * (descriptor >> 2 & 1)  # content checksum
    return total if total > limit or at == len(stream) else None


def _check_object(blob: bytes, what: str, exact_bytes: int) -> None:
    """``blob`` is exactly one SEAL object that inflates to no more than its role can hold."""
    if len(blob) < SEAL_HEADER.size:
        raise IntegrityError(f"{what} is not a SEAL object ({len(blob)} bytes)")
    magic, header_size, _, _, compression, _, size = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC or header_size != SEAL_HEADER.size:
        raise IntegrityError(f"{what} is not a SEAL object (bad SEAL header)")
    if size != len(blob):
        raise IntegrityError(f"{what} is {len(blob)} bytes but its SEAL header says {size}: "
                             "trailing or missing bytes are refused")
    limit = INFLATE_FACTOR * exact_bytes + INFLATE_SLACK
    members = memoryview(blob)[SEAL_HEADER.size:]
    if compression == COMPR_NONE:
        inflated: int | None = len(members)
    elif compression == COMPR_ZSTD:
        inflated = _zstd_inflated_bound(members, limit)
    else:
        raise IntegrityError(f"{what} uses SEAL compression mode {compression}; only none and zstd are accepted")
    if inflated is None:
        raise IntegrityError(f"{what} is not a SEAL object (malformed zstd stream)")
    if inflated > limit:
        raise IntegrityError(f"{what} would inflate past {limit} bytes, more than these parameters allow")


class _Scratch:
    """A private (0700) folder for SEAL's file-only serialization; each call gets its own file."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="kdsec-seal-", dir=base)

    def _file(self) -> tuple[int, str]:
        # mkstemp: a fresh random name opened O_CREAT|O_EXCL, mode 0600.
        return tempfile.mkstemp(dir=self._dir.name)

    def dump(self, obj) -> bytes:
        descriptor, path = self._file()
        os.close(descriptor)
        try:
            obj.save(path)
            return Path(path).read_bytes()
        finally:
            os.unlink(path)

    def load(self, obj, context, blob: bytes, what: str, exact_bytes: int):
        """Load ``blob`` into ``obj`` once ``_check_object`` accepts it for a role of ``exact_bytes``."""
        _check_object(blob, what, exact_bytes)
        descriptor, path = self._file()
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(blob)
            obj.load(context, path)
        except (RuntimeError, ValueError) as exc:
            raise IntegrityError(f"{what} is not a valid SEAL object for these parameters ({exc})") from None
        finally:
            os.unlink(path)
        return obj


_scratch: _Scratch | None = None
_scratch_lock = threading.Lock()


def scratch() -> _Scratch:
    global _scratch
    with _scratch_lock:
        if _scratch is None:
            _scratch = _Scratch()
        return _scratch


def _context(params: HEParams):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree,
                                                         list(params.coeff_mod_bit_sizes)))
    except (RuntimeError, ValueError) as exc:  # e.g. too few primes of that size for the ring
        raise ConfigError(f"SEAL cannot build the CKKS moduli {params.as_dict()}: {exc}") from None
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ConfigError(f"SEAL rejected the CKKS parameters {params.as_dict()}: {context.parameters_error_message()}")
    return context


def _galois_elements(header: dict) -> set[int]:
    ring = header["params"]["poly_modulus_degree"]
    return {galois_element(step, ring) for step in header["rotation_steps"]}


class PublicContext:
    """Parameters and public keys: encrypt, evaluate, rotate — never decrypt."""

    def __init__(self, params: HEParams, public_key, relin_keys, galois_keys=None,
                 rotation_steps: tuple[int, ...] = (), context=None) -> None:
        self.params = params
        self.context = context or _context(params)
        self.public_key, self.relin_keys, self.galois_keys = public_key, relin_keys, galois_keys
        self.rotation_steps = tuple(rotation_steps)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.encryptor = seal.Encryptor(self.context, public_key)
        self.counts: Counter[str] = Counter()  # homomorphic operations performed, by kind

    # -- serialization ------------------------------------------------------------------------
    def serialize(self) -> bytes:
        store = scratch()
        roles = ["public_key", "relin_keys"] + (["galois_keys"] if self.galois_keys is not None else [])
        blobs = [store.dump(getattr(self, role)) for role in roles]
        return pack({"kind": "public-context", "params": self.params.as_dict(), "roles": roles,
                     "rotation_steps": list(self.rotation_steps)}, blobs)

    @staticmethod
    def declared(data: bytes) -> tuple[HEParams, int, tuple[int, ...]]:
        """The parameters, rotation-key count and rotation steps a public context declares,
        validated, before any SEAL work: what a host needs to decide whether it has room for it."""
        header, _ = read_header(data, "public-context")
        return HEParams.from_dict(header["params"]), len(_galois_elements(header)), tuple(header["rotation_steps"])

    @classmethod
    def deserialize(cls, data: bytes) -> PublicContext:
        """Accepts exactly a public key, relinearization keys and the declared rotation keys, each
        blob one whole SEAL object: a secret key cannot ride along in a field, a role or a tail."""
        header, blobs = unpack(data, "public-context")
        params = HEParams.from_dict(header["params"])
        elements = _galois_elements(header)
        context = _context(params)
        store, key = scratch(), params.key_ciphertext_bytes
        data_primes = len(params.coeff_mod_bit_sizes) - 1
        public_key = store.load(seal.PublicKey(), context, blobs[0], "public key", key)
        relin_keys = store.load(seal.RelinKeys(), context, blobs[1], "relinearization keys", data_primes * key)
        if relin_keys.size() != 1:
            raise IntegrityError(f"expected one relinearization key, got {relin_keys.size()}")
        galois = None
        if elements:
            galois = store.load(seal.GaloisKeys(), context, blobs[2], "rotation keys",
                                len(elements) * data_primes * key)
            if galois.size() != len(elements) or not all(galois.has_key(element) for element in elements):
                raise IntegrityError(f"the rotation keys ({galois.size()}) do not match the declared "
                                     f"rotation_steps ({len(elements)} distinct rotations)")
        return cls(params, public_key, relin_keys, galois, tuple(header["rotation_steps"]), context)

    def dump_ciphertexts(self, ciphertexts: list) -> bytes:
        store = scratch()
        return pack({"kind": "ciphertexts"}, [store.dump(ct) for ct in ciphertexts])

    def load_ciphertexts(self, data: bytes, expected: int | None = None) -> list:
        """The ciphertexts of a bundle; with ``expected``, a bundle of another count is refused
        before any is loaded."""
        store = scratch()
        blobs = unpack(data, "ciphertexts")[1]
        if expected is not None and len(blobs) != expected:
            raise IntegrityError(f"expected {expected} ciphertexts, got {len(blobs)}")
        return [store.load(seal.Ciphertext(), self.context, blob, "ciphertext", self.params.key_ciphertext_bytes)
                for blob in blobs]

    # -- arithmetic ---------------------------------------------------------------------------
    def encode(self, values, parms_id, scale: float | None = None):
        plain = seal.Plaintext()
        if isinstance(values, np.ndarray):
            values = values.astype(np.float64).tolist()
        self.encoder.encode(values, parms_id, self.params.scale if scale is None else scale, plain)
        return plain

    def encrypt(self, values):
        ciphertext = seal.Ciphertext()
        self.encryptor.encrypt(self.encode(values, self.context.first_parms_id()), ciphertext)
        return ciphertext

    def multiply_plain(self, ciphertext, values):
        """Product with plaintext ``values`` (scalar or vector) at the scale Δ; not rescaled."""
        return self.multiply_encoded(ciphertext, self.encode(values, ciphertext.parms_id()))

    def multiply_encoded(self, ciphertext, plain):
        """Product with a plaintext already encoded at ``ciphertext``'s level (encode once, use often)."""
        self.counts["multiply_plain"] += 1
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(ciphertext, plain, out)
        return out

    def multiply(self, left, right):
        """Ciphertext product, relinearized; not rescaled."""
        self.counts["multiply"] += 1
        out = seal.Ciphertext()
        self.evaluator.multiply(left, right, out)
        return self.relinearize(out)

    def square(self, ciphertext, relinearize: bool = True, rescale: bool = True):
        """x², rescaled (unless not ``rescale``). Without ``relinearize`` the result keeps three
        components: a weighted sum of many such squares is then relinearized once (see
        ``relinearize``), not once per term."""
        self.counts["square"] += 1
        out = seal.Ciphertext()
        self.evaluator.square(ciphertext, out)
        if relinearize:
            self.relinearize(out)
        return self.rescale(out) if rescale else out

    def relinearize(self, ciphertext):
        if ciphertext.size() > 2:
            self.counts["relinearize"] += 1
            self.evaluator.relinearize_inplace(ciphertext, self.relin_keys)
        return ciphertext

    def rescale(self, ciphertext):
        """Drop one prime; snap the scale back to Δ (as TenSEAL does: relative error ~1e-4)."""
        self.evaluator.rescale_to_next_inplace(ciphertext)
        ciphertext.scale = self.params.scale
        return ciphertext

    def add_inplace(self, accumulator, ciphertext):
        self.evaluator.add_inplace(accumulator, ciphertext)
        return accumulator

    def add_plain(self, ciphertext, values):
        self.evaluator.add_plain_inplace(ciphertext, self.encode(values, ciphertext.parms_id(), ciphertext.scale))
        return ciphertext

    def match_level(self, ciphertext, reference):
        """Mod-switch ``ciphertext`` down to ``reference``'s level and scale."""
        if ciphertext.parms_id() != reference.parms_id():
            self.evaluator.mod_switch_to_inplace(ciphertext, reference.parms_id())
        ciphertext.scale = reference.scale
        return ciphertext

    def rotate(self, ciphertext, step: int):
        if self.galois_keys is None or step not in self.rotation_steps:
            raise IntegrityError(f"no rotation key for step {step}: the key holder must generate the plan's keys")
        self.counts["rotate"] += 1
        out = seal.Ciphertext()
        self.evaluator.rotate_vector(ciphertext, step, self.galois_keys, out)
        return out

    def rotate_and_sum(self, ciphertext, steps: list[int]):
        """``ct += rotate(ct, s)`` for each step: sums ``len(steps)``-fold doubling windows."""
        for step in steps:
            ciphertext = self.add_inplace(self.rotate(ciphertext, step), ciphertext)
        return ciphertext

    def parms_id_at(self, rescales: int):
        """The parameters id after ``rescales`` rescales from the top."""
        data = self.context.first_context_data()
        for _ in range(rescales):
            data = data.next_context_data()
        return data.parms_id()


class KeyHolder:
    """Owns the secret key: creates the public context, encrypts, decrypts. Never serializes the secret key."""

    def __init__(self, params: HEParams, rotation_steps: tuple[int, ...] = ()) -> None:
        self.params = params
        self.context = _context(params)
        keygen = seal.KeyGenerator(self.context)
        self._secret_key = keygen.secret_key()
        public_key, relin_keys = seal.PublicKey(), seal.RelinKeys()
        keygen.create_public_key(public_key)
        keygen.create_relin_keys(relin_keys)
        galois_keys = None
        steps = tuple(sorted(set(rotation_steps)))
        if steps:
            galois_keys = seal.GaloisKeys()
            # Pass Galois elements, not steps: the bindings read a list of non-negative ints as elements.
            keygen.create_galois_keys([galois_element(s, params.poly_modulus_degree) for s in steps], galois_keys)
        self.public = PublicContext(params, public_key, relin_keys, galois_keys, steps, self.context)
        self._decryptor = seal.Decryptor(self.context, self._secret_key)
        # The key holder encrypts with its secret key: ~2× faster than public-key encryption.
        self._encryptor = seal.Encryptor(self.context, self._secret_key)

    def __repr__(self) -> str:
        return f"KeyHolder({self.params.as_dict()}, secret key held)"

    def public_context(self) -> bytes:
        return self.public.serialize()

    def secret_key_in(self, *blobs: bytes) -> bool:
        """Whether any of ``blobs`` (what a host was handed) carries this holder's secret key."""
        secret = scratch().dump(self._secret_key)
        return any(secret in blob for blob in blobs)

    def encrypt(self, values):
        ciphertext = seal.Ciphertext()
        self._encryptor.encrypt_symmetric(self.public.encode(values, self.context.first_parms_id()), ciphertext)
        return ciphertext

    def encrypt_bundle(self, rows) -> bytes:
        """``rows`` encrypted and packed for the wire in SEAL's seeded form: a symmetric
        ciphertext's second polynomial is uniformly random, so it travels as the seed of its PRNG
        and the receiver expands it on load: half the bytes, and no full ciphertext is written."""
        store, parms_id = scratch(), self.context.first_parms_id()
        return pack({"kind": "ciphertexts"},
                    [store.dump(self._encryptor.encrypt_symmetric(self.public.encode(row, parms_id))) for row in rows])

    def decrypt(self, ciphertext) -> np.ndarray:
        plain = seal.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.public.encoder.decode_double(plain))
