"""Key providers: who holds the key-encryption key (KEK), and the Ed25519 signing key.

A ``KeyProvider`` wraps and unwraps per-artifact data keys; the KEK itself never leaves it.
The local providers (an environment variable, a 0600 key file) wrap with AES-256-GCM; a KMS
provider implements the same three members (``kind``, ``key_id``, ``wrap``/``unwrap``) and
calls its service instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kdsec.crypto.at_rest import KEY_BYTES, NONCE_BYTES, ModelKey, load_or_create_key
from kdsec.errors import IntegrityError, KeyMaterialError


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
    """A new 0600 key file: a 32-byte KEK (base64) or an Ed25519 signing key (PEM) plus its .pub."""
    if path.exists():
        raise KeyMaterialError(f"'{path}' already exists; refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if kind == "kek":
        material = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    else:
        private = Ed25519PrivateKey.generate()
        material = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(material)
    if kind == "signing":
        public_key_path(path).write_bytes(_public_pem(private.public_key()))
    return path


# --- signing ------------------------------------------------------------------------------------


def public_key_path(signing_key_file: Path) -> Path:
    return signing_key_file.with_name(signing_key_file.name + ".pub")


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return binascii.hexlify(raw[:8]).decode()


@dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey
    source: str

    def __repr__(self) -> str:
        return f"Signer(source={self.source!r}, key_id={self.key_id})"

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return public_key_id(self.public)

    def sign(self, payload: bytes) -> bytes:
        return self.private.sign(payload)


def load_or_create_signer(signing_env: str, signing_file: str | Path) -> Signer:
    """The Ed25519 key from ``$signing_env`` (PEM or base64 of the 32 raw bytes) or a 0600 PEM file,
    created with its ``.pub`` on first use."""
    if text := os.environ.get(signing_env):
        return Signer(_parse_private(text.encode(), f"${signing_env}"), f"env:{signing_env}")
    path = Path(signing_file)
    if not path.exists():
        generate_key_file(path, "signing")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(f"signing key '{path}' is readable by other users (mode {mode:o}); run: chmod 600 {path}")
    signer = Signer(_parse_private(path.read_bytes(), f"signing key '{path}'"), f"file:{path}")
    if not public_key_path(path).exists():
        public_key_path(path).write_bytes(_public_pem(signer.public))
    return signer


def _parse_private(data: bytes, where: str) -> Ed25519PrivateKey:
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, TypeError, binascii.Error):
        raise KeyMaterialError(f"{where} is not an Ed25519 private key (PEM, or base64 of 32 bytes)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"{where} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"public key '{path}' not found") from None
    except ValueError:
        raise KeyMaterialError(f"'{path}' is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"'{path}' is not an Ed25519 public key")
    return key


def raw_public(public: Ed25519PublicKey) -> str:
    return _b64(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verify_signature(public: Ed25519PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        public.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
