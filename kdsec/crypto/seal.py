"""A thin typed layer over Microsoft SEAL's CKKS through TenSEAL's ``sealapi`` bindings.

TenSEAL's high-level vectors rescale after every product and expose no rotations. The HE
engine needs both lazy rescaling (one rescale per neuron, not one per weight: ~4× fewer NTTs)
and explicit rotations (the single-sample and encrypted-model layouts), so it drives SEAL
directly. SEAL objects serialize only to files; ``dump``/``load`` go through a private temp
folder (in memory where /dev/shm exists).

Roles: ``KeyHolder`` owns the secret key; ``PublicContext`` is everything a host may hold
(parameters, public key, relinearization and rotation keys) and is what travels.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from kdsec.errors import ConfigError, IntegrityError

# Largest total coefficient-modulus bits per ring degree at 128-bit security (HE standard, as SEAL enforces).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
BUNDLE_MAGIC = b"KDSECHE1"
PUBLIC_ROLES = ["public_key", "relin_keys", "galois_keys"]


@dataclass(frozen=True)
class HEParams:
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescales available: every modulus but the first (decryption) and last (key switching)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def as_dict(self) -> dict:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "scale_bits": self.scale_bits}


def plan_params(depth: int, scale_bits: int, integer_bits: int, poly_modulus_degree: int | str = "auto",
                min_slots: int = 1) -> HEParams:
    """The smallest secure ring for ``depth`` rescales at ``scale_bits`` precision: moduli
    ``[scale+integer, scale × depth, scale+integer]``, checked against the 128-bit bound."""
    outer = scale_bits + integer_bits
    bits = (outer, *([scale_bits] * depth), outer)
    rings = sorted(MAX_MODULUS_BITS) if poly_modulus_degree == "auto" else [int(poly_modulus_degree)]
    for ring in rings:
        if ring // 2 >= min_slots and sum(bits) <= MAX_MODULUS_BITS[ring]:
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


def galois_element(step: int, n: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots (negative: right)."""
    slots = n // 2
    exponent = (slots - (-step)) % slots if step < 0 else step % slots
    return pow(3, exponent, 2 * n)


class _Scratch:
    """A private folder for SEAL's file-only serialization."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="kdsec-seal-", dir=base)
        self.path = Path(self._dir.name) / "object"

    def dump(self, obj) -> bytes:
        obj.save(str(self.path))
        try:
            return self.path.read_bytes()
        finally:
            self.path.unlink(missing_ok=True)

    def load(self, obj, context, blob: bytes, what: str):
        self.path.write_bytes(blob)
        try:
            obj.load(context, str(self.path)) if context is not None else obj.load(str(self.path))
        except (RuntimeError, ValueError) as exc:
            raise IntegrityError(f"{what} is not a valid SEAL object for these parameters ({exc})") from None
        finally:
            self.path.unlink(missing_ok=True)
        return obj


_scratch: _Scratch | None = None


def scratch() -> _Scratch:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    return _scratch


def pack(header: dict, blobs: list[bytes]) -> bytes:
    """A length-prefixed container: magic, JSON header (with blob sizes), then the blobs."""
    head = json.dumps({**header, "sizes": [len(blob) for blob in blobs]}).encode()
    return BUNDLE_MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


def unpack(data: bytes, kind: str) -> tuple[dict, list[bytes]]:
    if not data.startswith(BUNDLE_MAGIC) or len(data) < len(BUNDLE_MAGIC) + 4:
        raise IntegrityError(f"not a kdsec HE {kind} (bad magic or truncated)")
    (length,) = struct.unpack(">I", data[len(BUNDLE_MAGIC):len(BUNDLE_MAGIC) + 4])
    start = len(BUNDLE_MAGIC) + 4
    try:
        header = json.loads(data[start:start + length])
    except ValueError:
        raise IntegrityError(f"kdsec HE {kind}: unreadable header") from None
    if header.get("kind") != kind:
        raise IntegrityError(f"expected a kdsec HE {kind}, got {header.get('kind')!r}")
    offset, blobs = start + length, []
    for size in header["sizes"]:
        blobs.append(data[offset:offset + size])
        offset += size
    if offset != len(data) or any(len(blob) != size for blob, size in zip(blobs, header["sizes"])):
        raise IntegrityError(f"kdsec HE {kind} is truncated or has trailing bytes")
    return header, blobs


def _context(params: HEParams):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ConfigError(f"SEAL rejected the CKKS parameters {params.as_dict()}: {context.parameters_error_message()}")
    return context


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

    @classmethod
    def deserialize(cls, data: bytes) -> PublicContext:
        header, blobs = unpack(data, "public-context")
        if header.get("roles") not in (PUBLIC_ROLES[:2], PUBLIC_ROLES) or len(blobs) != len(header["roles"]):
            raise IntegrityError("a kdsec public context holds a public key, relinearization keys and optionally "
                                 f"rotation keys, nothing else (got {header.get('roles')}; a secret key is never accepted)")
        raw = header["params"]
        params = HEParams(raw["poly_modulus_degree"], tuple(raw["coeff_mod_bit_sizes"]), raw["scale_bits"])
        context = _context(params)
        store = scratch()
        public_key = store.load(seal.PublicKey(), context, blobs[0], "public key")
        relin_keys = store.load(seal.RelinKeys(), context, blobs[1], "relinearization keys")
        galois = store.load(seal.GaloisKeys(), context, blobs[2], "rotation keys") if len(blobs) == 3 else None
        return cls(params, public_key, relin_keys, galois, tuple(header["rotation_steps"]), context)

    def dump_ciphertexts(self, ciphertexts: list) -> bytes:
        store = scratch()
        return pack({"kind": "ciphertexts"}, [store.dump(ct) for ct in ciphertexts])

    def load_ciphertexts(self, data: bytes) -> list:
        store = scratch()
        return [store.load(seal.Ciphertext(), self.context, blob, "ciphertext")
                for blob in unpack(data, "ciphertexts")[1]]

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
        self.counts["multiply_plain"] += 1
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(ciphertext, self.encode(values, ciphertext.parms_id()), out)
        return out

    def multiply(self, left, right):
        """Ciphertext product, relinearized; not rescaled."""
        self.counts["multiply"] += 1
        out = seal.Ciphertext()
        self.evaluator.multiply(left, right, out)
        return self.relinearize(out)

    def square(self, ciphertext, relinearize: bool = True):
        """x², rescaled. Without ``relinearize`` the result keeps three components: a weighted sum
        of many such squares is then relinearized once (see ``relinearize``), not once per term."""
        self.counts["square"] += 1
        out = seal.Ciphertext()
        self.evaluator.square(ciphertext, out)
        if relinearize:
            self.relinearize(out)
        return self.rescale(out)

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

    def decrypt(self, ciphertext) -> np.ndarray:
        plain = seal.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.public.encoder.decode_double(plain))
