"""The layering docs/layout.md draws, enforced: flows → tasks → kdsec, kdsec never
imports Prefect, and inside kdsec each part imports only the parts below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# kdsec's parts, top to bottom (as docs/layout.md lists them); one row may import itself and below.
LAYERS = [
    {"cli", "he_cli"}, {"review"}, {"report"}, {"summary"}, {"tracking"}, {"pyfunc_model", "pyfunc_entry"}, {"mlflow_auth"},
    {"preflight"}, {"gates"}, {"explain"}, {"audit"}, {"he"}, {"crypto"}, {"compress"}, {"trainers"}, {"sweep"}, {"cache"},
    {"distill"}, {"dp_sgd"}, {"train"}, {"models"}, {"data"}, {"compute", "compute_probe"},
    {"config", "roles", "catalog", "fileio", "errors", "device", "progress"},
]
RANK = {part: index for index, row in enumerate(LAYERS) for part in row}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "kdsec":
                names += [f"kdsec.{alias.name}" for alias in node.names]
    return names


def _part(module: str) -> str:
    return module.split(".")[1]


def test_every_kdsec_part_has_a_place_in_the_layers():
    parts = {path.stem if path.parent.name == "kdsec" else path.parent.name
             for path in (ROOT / "kdsec").glob("*") if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert parts - {"__init__"} == set(RANK), "add the new part to LAYERS and to docs/layout.md"


@pytest.mark.parametrize("path", sorted((ROOT / "kdsec").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_kdsec_imports_only_downwards_and_never_the_orchestration(path):
    relative = path.relative_to(ROOT / "kdsec")
    own = relative.parts[0].removesuffix(".py")
    if own == "__init__":
        return
    for name in _imports(path):
        if own == "cli" and name in ("flows.kd_pipeline", "flows.run_requests", "flows"):
            continue  # ``kdsec run`` starts the flow (and the local server): the one lazy way up
        assert name.split(".")[0] not in ("prefect", "tasks", "flows"), f"{relative} imports {name}"
        if name.startswith("kdsec.") and _part(name) != own:
            assert RANK[_part(name)] >= RANK[own], f"{relative} ({own}) imports {name}, a layer above it"


@pytest.mark.parametrize("folder,allowed", [("tasks", {"kdsec"}), ("flows", {"kdsec", "tasks"})])
def test_orchestration_imports_downwards(folder, allowed):
    for path in (ROOT / folder).glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("kdsec", "tasks", "flows") and top != folder:
                assert top in allowed, f"{path.name} imports {name}"


@pytest.mark.parametrize("folder", ["flows", "tasks"])
def test_no_flow_or_task_module_shadows_an_installed_package(folder):
    """Prefect puts a flow file's folder on sys.path when it loads it: a ``flows/requests.py``
    would then replace the requests library in the worker's flow process (every run crashed)."""
    import importlib.util

    for path in (ROOT / folder).glob("*.py"):
        spec = importlib.util.find_spec(path.stem) if path.stem != "__init__" else None
        assert spec is None, f"{folder}/{path.name} would shadow {spec.origin}"
