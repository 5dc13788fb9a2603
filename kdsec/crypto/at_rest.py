"""Authenticated encryption of model artifacts at rest (AES-256-GCM, ``cryptography``).

File format: ``MAGIC | 12-byte random nonce | ciphertext || 16-byte tag``. The associated data
(e.g. the registered model name) is authenticated but not stored, so a file cannot be passed
off as another model's. The key comes from an environment variable or a 0600 key file, and
never reaches logs, MLflow or reports: only its fingerprint does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kdsec.errors import IntegrityError, KeyMaterialError

MAGIC = b"KDSECGCM1"
NONCE_BYTES = 12
KEY_BYTES = 32


@dataclass(frozen=True)
class ModelKey:
    """A 256-bit key and where it came from. ``repr`` never shows the key."""

    material: bytes
    source: str

    def __repr__(self) -> str:
        return f"ModelKey(source={self.source!r}, fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        """A public identifier of the key (truncated SHA-256), safe to log."""
        return hashlib.sha256(b"kdsec-key-id" + self.material).hexdigest()[:12]


def _decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            material = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(material) == KEY_BYTES:
            return material
    raise KeyMaterialError(f"{where} must hold a 32-byte key as 64 hex characters or base64 "
                           f"(generate one with: python -c \"import os,base64;print(base64.b64encode(os.urandom(32)).decode())\")")


def load_or_create_key(key_env: str, key_file: str | Path) -> ModelKey:
    """The key from ``$key_env`` if set, else from ``key_file``, created (0600) on first use."""
    if os.environ.get(key_env):
        return ModelKey(_decode_key(os.environ[key_env], f"${key_env}"), f"env:{key_env}")
    path = Path(key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(f"key file '{path}' is readable by other users (mode {mode:o}); run: chmod 600 {path}")
    return ModelKey(_decode_key(path.read_text(), f"key file '{path}'"), f"file:{path}")


def encrypt_bytes(plaintext: bytes, key: ModelKey, associated_data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key.material).encrypt(nonce, plaintext, MAGIC + associated_data)


def decrypt_bytes(blob: bytes, key: ModelKey, associated_data: bytes, name: str = "artifact") -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise IntegrityError(f"{name} is not a kdsec encrypted artifact or is truncated")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key.material).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], MAGIC + associated_data)
    except InvalidTag:
        raise IntegrityError(f"{name} failed authentication: wrong key, wrong model name, or tampered bytes") from None


def encrypt_file(source: Path, destination: Path, key: ModelKey, associated_data: bytes) -> Path:
    """Encrypt ``source`` into ``destination`` atomically (no partial file on failure)."""
    blob = encrypt_bytes(source.read_bytes(), key, associated_data)
    partial = destination.with_name(destination.name + ".partial")
    partial.write_bytes(blob)
    partial.replace(destination)
    return destination


def decrypt_file(source: Path, key: ModelKey, associated_data: bytes) -> bytes:
    return decrypt_bytes(source.read_bytes(), key, associated_data, name=f"'{source}'")


@dataclass(frozen=True)
class AtRestResult:
    encrypted_path: str
    encrypted_bytes: int
    key_source: str
    key_fingerprint: str
    roundtrip_exact: bool
    tamper_rejected: bool
    wrong_key_rejected: bool

    @property
    def passed(self) -> bool:
        return self.roundtrip_exact and self.tamper_rejected and self.wrong_key_rejected


def protect_and_verify(checkpoint: Path, destination: Path, key: ModelKey, associated_data: bytes) -> AtRestResult:
    """Encrypt a checkpoint, then prove the protection: it decrypts bit-exact, a copy with one
    flipped byte is rejected, and a different key is rejected."""
    encrypt_file(checkpoint, destination, key, associated_data)
    blob = destination.read_bytes()
    roundtrip_exact = decrypt_bytes(blob, key, associated_data) == checkpoint.read_bytes()
    tampered = bytearray(blob)
    tampered[len(MAGIC) + NONCE_BYTES + len(tampered[len(MAGIC) + NONCE_BYTES :]) // 2] ^= 0x01
    return AtRestResult(
        encrypted_path=str(destination),
        encrypted_bytes=len(blob),
        key_source=key.source,
        key_fingerprint=key.fingerprint,
        roundtrip_exact=roundtrip_exact,
        tamper_rejected=_rejects(bytes(tampered), key, associated_data),
        wrong_key_rejected=_rejects(blob, ModelKey(os.urandom(KEY_BYTES), "random"), associated_data),
    )


def _rejects(blob: bytes, key: ModelKey, associated_data: bytes) -> bool:
    try:
        decrypt_bytes(blob, key, associated_data)
    except IntegrityError:
        return True
    return False
