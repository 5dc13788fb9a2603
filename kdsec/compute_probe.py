"""What a Dask worker runs with: Python, the packages the cluster's tasks need, and a digest of
the project's own code. Sent to workers *by value* (``cloudpickle.register_pickle_by_value``),
so it answers on a worker that lacks kdsec, too; it imports nothing from kdsec."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import platform
from pathlib import Path

PACKAGES = ("torch", "numpy", "scipy", "tenseal", "safetensors", "dask", "distributed", "cloudpickle", "prefect")
PROJECT = ("kdsec", "tasks")  # the project's packages a task's code comes from: compared by a digest of their sources


def source_digest(package: str) -> str | None:
    """sha256 over the package's ``*.py`` files (relative path and bytes), None if not importable."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    for source in sorted(root.rglob("*.py")):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict[str, str | None]:
    """``python``, each of ``PACKAGES``' version (None: missing), each of ``PROJECT``'s digest."""
    found: dict[str, str | None] = {"python": ".".join(platform.python_version_tuple()[:2])}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    for name in PROJECT:
        found[name] = source_digest(name)
    return found
