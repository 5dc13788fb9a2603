"""The one way kdsec writes and reads files at a trust boundary.

Writes are atomic (a reader sees the old file or the complete new one) and never follow a link:
the bytes go to a temporary file with a random name created exclusively in the target folder
(``O_CREAT | O_EXCL``, which refuses an existing file or a planted symlink), its mode is set
explicitly, it is flushed to disk, then renamed over the target. On any error the temporary file
is removed, so no plaintext is left behind. Reads of untrusted files refuse links and anything
but a regular file, check the size from ``fstat`` before reading, and read in bounded chunks.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path

from kdsec.errors import KdsecError

PRIVATE = 0o600  # secrets, plaintext weights, and private data (the splits: who was a training member)
PUBLIC = 0o644  # everything else kdsec writes (reports, encrypted packages, public keys, metadata)
CHUNK = 1 << 20


def write_atomic(path: Path, data: bytes | str, mode: int = PUBLIC, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` with final permissions ``mode``. With ``overwrite`` false an
    existing ``path`` (file, link or anything else) is refused, atomically (no check-then-write race)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise KdsecError(f"'{path}' is a directory; give a file path")
    if not overwrite and os.path.lexists(path):
        raise KdsecError(f"'{path}' already exists; choose another path (or --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if anything appeared at path meanwhile
            except FileExistsError:
                raise KdsecError(f"'{path}' already exists; choose another path (or --force to replace it)") from None
            os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_bounded(path: Path, limit: int, what: str = "file", expected: int | None = None,
                 error: type[KdsecError] = KdsecError) -> bytes:
    """The bytes of ``path``, a regular file (not a link) of at most ``limit`` bytes (exactly
    ``expected`` when given), read in chunks; the size is checked before anything is read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{what} '{path}' is missing") from None
    except OSError as exc:
        if os.path.islink(path):
            raise error(f"{what} '{path}' is a symbolic link; refusing to follow it") from None
        raise error(f"{what} '{path}' cannot be read ({exc.strerror})") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise error(f"{what} '{path}' is not a regular file")
    with os.fdopen(descriptor, "rb") as handle:
        if expected is not None and info.st_size != expected:
            raise error(f"{what} '{path}' is truncated or padded: {info.st_size} bytes, expected {expected}")
        if info.st_size > limit:
            raise error(f"{what} '{path}' is {info.st_size} bytes, over the limit of {limit}")
        chunks, total = [], 0
        while chunk := handle.read(min(CHUNK, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew after fstat
                raise error(f"{what} '{path}' grew past the limit of {limit} bytes while being read")
    data = b"".join(chunks)
    if expected is not None and len(data) != expected:
        raise error(f"{what} '{path}' changed while being read: {len(data)} bytes, expected {expected}")
    return data


def strict_json(document, indent: int | None = 2) -> str:
    """``document`` as strict JSON (RFC 8259: what ``JSON.parse`` and strict parsers accept): a
    NaN or infinite float — an empty calibration bin, a metric with nothing to measure — becomes
    ``null``; anything else json cannot hold is written as its ``str``."""
    return json.dumps(_finite(document), indent=indent, default=str, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
