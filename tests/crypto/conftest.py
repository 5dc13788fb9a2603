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
