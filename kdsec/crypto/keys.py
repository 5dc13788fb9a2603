"""Key providers: who holds the key-encryption key (KEK), and the package signing key.

A ``KeyProvider`` wraps and unwraps per-artifact data keys; the KEK itself never leaves it.
The local providers (an environment variable, a 0600 key file) wrap with AES-256-GCM; a KMS
provider implements the same three members (``kind``, ``key_id``, ``wrap``/``unwrap``) and
calls its service instead.

Packages are signed with an ECDSA P-256 key: the same key signs kdsec's manifest and the OpenSSF
``model_signing`` signature of the whole folder (that library takes NIST curves only, not Ed25519).
Manifests signed by the Ed25519 keys of older kdsec releases still verify against their public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kdsec.crypto.model_key import (KEY_BYTES, NONCE_BYTES, ModelKey, create_once, load_or_create_key,
                                    read_private_file)
from kdsec.errors import IntegrityError, KeyMaterialError
from kdsec.fileio import PRIVATE, PUBLIC, read_bounded, write_atomic

SIGNING_ALGORITHM = "ECDSA-P256-SHA256"
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey  # Ed25519: verification of older packages only
KEY_FILE_LIMIT = 64 * 1024


class KeyProvider(Protocol):
    kind: str
    key_id: str  # a public identifier of the KEK (safe to store and log)

    def wrap(self, data_key: bytes, context: bytes) -> dict[str, str]: ...

    def unwrap(self, record: dict[str, str], context: bytes) -> bytes: ...


@dataclass(frozen=True)
class LocalKeyProvider:
    """A KEK held locally (env var or key file); wraps data keys with AES-256-GCM."""

    key: ModelKey

    @property
    def kind(self) -> str:
        return self.key.source.split(":", 1)[0]

    @property
    def key_id(self) -> str:
        return self.key.fingerprint

    def wrap(self, data_key: bytes, context: bytes) -> dict[str, str]:
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(self.key.material).encrypt(nonce, data_key, b"kdsec-wrap/1|" + context)
        return {"provider": self.kind, "key_id": self.key_id, "nonce": _b64(nonce), "wrapped": _b64(wrapped)}

    def unwrap(self, record: dict[str, str], context: bytes) -> bytes:
        if record.get("key_id") != self.key_id:
            raise IntegrityError(f"wrong key: the data key is wrapped under key-encryption key {record.get('key_id')}, "
                                 f"but the configured key ({self.key.source}) is {self.key_id}")
        try:
            return AESGCM(self.key.material).decrypt(_unb64(record["nonce"]), _unb64(record["wrapped"]),
                                                     b"kdsec-wrap/1|" + context)
        except (InvalidTag, KeyError, ValueError):
            raise IntegrityError("wrong key or tampered key record: the data key does not unwrap") from None


def local_key_provider(key_env: str | None, key_file: str | Path, create: bool = True) -> LocalKeyProvider:
    """The KEK from ``$key_env`` if set, else ``key_file`` (created 0600 on first use when ``create``)."""
    if not create and not (key_env and os.environ.get(key_env)) and not Path(key_file).is_file():
        raise KeyMaterialError(f"no key-encryption key: key file '{key_file}' not found"
                               + (f" and ${key_env} is not set" if key_env else "")
                               + f" (create one with: kdsec keygen --out {key_file or 'PATH'})")
    return LocalKeyProvider(load_or_create_key(key_env, key_file))


def generate_key_file(path: Path, kind: str) -> Path:
    """A new 0600 key file: a 32-byte KEK (base64) or an ECDSA P-256 signing key (PEM) plus its .pub."""
    if os.path.lexists(path):
        raise KeyMaterialError(f"'{path}' already exists; refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if kind == "kek":
        material = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        material = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    write_atomic(path, material, mode=PRIVATE, overwrite=False)
    if kind == "signing":
        write_atomic(public_key_path(path), _public_pem(private.public_key()), mode=PUBLIC)
    return path


# --- signing ------------------------------------------------------------------------------------


def public_key_path(signing_key_file: Path) -> Path:
    return signing_key_file.with_name(signing_key_file.name + ".pub")


def _public_pem(public: PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_id(public: PublicKey) -> str:
    """A short public identifier: the first 8 bytes of SHA-256 over the DER public key."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    private: ec.EllipticCurvePrivateKey
    source: str

    def __repr__(self) -> str:
        return f"Signer(source={self.source!r}, key_id={self.key_id})"

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return public_key_id(self.public)

    @property
    def public_pem(self) -> bytes:
        return _public_pem(self.public)

    def sign(self, payload: bytes) -> bytes:
        return self.private.sign(payload, ec.ECDSA(hashes.SHA256()))


def load_or_create_signer(signing_env: str, signing_file: str | Path) -> Signer:
    """The ECDSA P-256 key from ``$signing_env`` (PEM) or a 0600 PEM file, created with its
    ``.pub`` on first use."""
    if text := os.environ.get(signing_env):
        return Signer(parse_private_key(text.encode(), f"${signing_env}"), f"env:{signing_env}")
    path = Path(signing_file)
    create_once(path, lambda: generate_key_file(path, "signing"))
    data = read_private_file(path, KEY_FILE_LIMIT, "signing key", "encrypt.signing_key_file")
    signer = Signer(parse_private_key(data, f"signing key '{path}'"), f"file:{path}")
    if not os.path.lexists(public_key_path(path)):
        write_atomic(public_key_path(path), signer.public_pem, mode=PUBLIC)
    return signer


def parse_private_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyMaterialError(f"{where} is not an unencrypted PEM private key "
                               "(create one with: kdsec keygen --kind signing --out PATH)") from None
    if isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"{where} is an Ed25519 key from an older kdsec; packages are now signed with ECDSA "
                               "P-256 (OpenSSF model signing takes NIST curves only): create a new key with "
                               "kdsec keygen --kind signing --out PATH")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyMaterialError(f"{where} is not an ECDSA P-256 key (create one with: kdsec keygen --kind signing)")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    data = read_bounded(Path(path), KEY_FILE_LIMIT, "public key", error=KeyMaterialError)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyMaterialError(f"'{path}' is not a PEM public key") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, Ed25519PublicKey)):
        raise KeyMaterialError(f"'{path}' is not an ECDSA P-256 (or older kdsec Ed25519) public key")
    return key


def raw_public(public: PublicKey) -> str:
    """The public key as base64 of its DER SubjectPublicKeyInfo (stored in the manifest)."""
    return _b64(public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def verify_signature(public: PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(public, Ed25519PublicKey):
            public.verify(signature, payload)
        else:
            public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
