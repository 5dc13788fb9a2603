"""The kdsec HE bundle: magic, a strict typed JSON header (exact keys, bounded counts and
numbers) and the blobs it sizes. Anything else is refused before SEAL sees a byte; each blob must
be exactly one SEAL object whose inflated size fits what its role can hold (``_check_object``)."""

from __future__ import annotations

import json
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from kdsec.errors import IntegrityError
from kdsec.he.params import (
    BUNDLE_MAGIC,
    COMPR_NONE,
    COMPR_ZSTD,
    INFLATE_FACTOR,
    INFLATE_SLACK,
    MAX_BLOBS,
    MAX_HEADER_BYTES,
    MAX_MODULUS_BITS,
    MAX_PRIME_BITS,
    MAX_ROTATIONS,
    MIN_INTEGER_BITS,
    MIN_LAST_SCALE_BITS,
    PUBLIC_ROLES,
    SEAL_HEADER,
    SEAL_MAGIC,
    ZSTD_BLOCK_MAX,
    ZSTD_BLOCK_MIN,
    ZSTD_MAGIC,
)

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


