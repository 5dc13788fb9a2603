"""Every file that holds plaintext weights or private data is written by the one safe writer:
owner-only (0600), atomically, and never through a link planted at its path."""

from __future__ import annotations

import stat

import pytest
import torch

from kdsec.compress import quantize_dynamic_int8, save_int8
from kdsec.compress.static_quant import quantize_static_int8, save_static_int8
from kdsec.config import DistillConfig
from kdsec.distill.distiller import OfflineDistiller
from kdsec.models import ModelSpec, build_model, save_checkpoint

MLP = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]})
CNN = ModelSpec("student_cnn", (1, 8, 8), 10, {"channels": [16, 32], "fc": 64})


def _model(spec):
    torch.manual_seed(0)
    return build_model(spec).eval()


WRITERS = {
    "splits": lambda digits, path: digits.save(path),
    "checkpoint": lambda digits, path: save_checkpoint(_model(MLP), MLP, path),
    "int8": lambda digits, path: save_int8(quantize_dynamic_int8(_model(MLP)), MLP, path),
    "static_int8": lambda digits, path: save_static_int8(quantize_static_int8(_model(CNN), digits.x_train[:64]),
                                                         CNN, path),
    "teacher_signals": lambda digits, path: OfflineDistiller(_model(MLP), digits.x_train, DistillConfig()).save(path),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_private_files_are_owner_only_and_a_planted_link_is_not_followed(kind, digits, tmp_path):
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    victim.chmod(0o644)
    path = tmp_path / "run" / f"{kind}{'.npz' if kind == 'splits' else '.safetensors'}"
    path.parent.mkdir()
    path.symlink_to(victim)
    written = WRITERS[kind](digits, path)
    assert written == path and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]  # no temporary file left behind
