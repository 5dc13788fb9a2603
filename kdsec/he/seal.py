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

import os
import tempfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from kdsec.errors import ConfigError, IntegrityError
from kdsec.he.bundle import _check_object, pack, read_header, unpack
from kdsec.he.params import HEParams, galois_element


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
