"""Symmetric key material for encryption at rest: a 256-bit key from an environment variable
or a 0600 key file. The key never reaches logs, MLflow or reports: only its fingerprint does.
(The package format that uses it lives in ``kdsec.crypto.package``.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdsec.errors import KdsecError, KeyMaterialError
from kdsec.fileio import PRIVATE, read_bounded, write_atomic

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


def load_or_create_key(key_env: str | None, key_file: str | Path) -> ModelKey:
    """The key from ``$key_env`` if set, else from ``key_file``, created (0600) on first use."""
    if key_env and os.environ.get(key_env):
        return ModelKey(_decode_key(os.environ[key_env], f"${key_env}"), f"env:{key_env}")
    path = Path(key_file)

    def create() -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n", mode=PRIVATE, overwrite=False)

    create_once(path, create)
    text = read_private_file(path, 4096, "key file", "encrypt.key_file").decode("ascii", errors="replace")
    return ModelKey(_decode_key(text, f"key file '{path}'"), f"file:{path}")


def create_once(path: Path, create: Callable[[], object]) -> None:
    """Create a missing key file; when another run created it first, use theirs."""
    if os.path.lexists(path):
        return
    try:
        create()
    except KdsecError:
        if not os.path.lexists(path):
            raise


def read_private_file(path: Path, limit: int, what: str, config_key: str) -> bytes:
    """A secret key file's bytes: a regular file (not a link) that only its owner can read."""
    if path.is_symlink():
        raise KeyMaterialError(f"{what} '{path}' is a symbolic link; point {config_key} at the key itself")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(f"{what} '{path}' is readable by other users (mode {mode:o}); run: chmod 600 {path}")
    return read_bounded(path, limit, what, error=KeyMaterialError)
