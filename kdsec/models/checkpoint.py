"""Safetensors checkpoints that name their own architecture (no pickle anywhere)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save
from torch import nn

from kdsec.errors import IntegrityError
from kdsec.fileio import PRIVATE, write_atomic
from kdsec.models.catalog import build_model
from kdsec.models.spec import ModelSpec


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """Save weights as safetensors with the architecture spec in the header metadata, owner-only (0600)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return write_atomic(path, save(state, metadata={"kdsec.spec": spec.to_json()}), mode=PRIVATE)


def read_kdsec_file(path: Path, description: str) -> tuple[ModelSpec, dict[str, str], dict]:
    """(spec, metadata, tensors) of a kdsec safetensors file; anything unreadable, or without a
    spec, is an IntegrityError saying the file is not ``description``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            spec = ModelSpec.from_json(metadata["kdsec.spec"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (KeyError, OSError, ValueError, SafetensorError) as exc:
        raise IntegrityError(f"'{path}' is not {description} ({exc})") from None
    return spec, metadata, tensors


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the architecture named in the checkpoint and load its weights (no pickle)."""
    spec, _, state = read_kdsec_file(path, "a kdsec safetensors checkpoint")
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    return model, spec
