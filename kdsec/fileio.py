"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through ``<path>.partial`` and a rename; ``mode`` (e.g. 0o600)
    is set when the partial file is created, so the content is never readable more widely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    payload = data.encode() if isinstance(data, str) else data
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(payload)
    os.replace(partial, path)
    return path
