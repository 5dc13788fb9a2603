"""A scratch working directory with a small student checkpoint, and the `kdsec` CLI run in it."""

import pytest
import torch
from typer.testing import CliRunner

from kdsec.cli import app
from kdsec.models import ModelSpec, build_model, save_checkpoint


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``student.safetensors`` in the working directory; keys come from files made here, not the env."""
    monkeypatch.chdir(tmp_path)
    for name in ("KDSEC_MODEL_KEY", "KDSEC_SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    spec = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [8]})
    save_checkpoint(build_model(spec), spec, tmp_path / "student.safetensors")
    return tmp_path


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def ops():
    """A small random he_mlp's HE operations (the HTTP host tests' model)."""
    from kdsec.he import he_ops

    torch.manual_seed(0)
    return he_ops(build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})))


@pytest.fixture(scope="module")
def holder(ops):
    """A key holder for ``ops``' batched path (no rotation keys)."""
    from kdsec.he.host import HEHost
    from kdsec.he.params import plan_params
    from kdsec.he.seal import KeyHolder

    plan = HEHost(ops).plan["batched"]
    return KeyHolder(plan_params(plan["depth"], 30, 14, "auto", plan["min_slots"]), ())
