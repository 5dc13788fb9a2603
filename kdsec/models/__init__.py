"""Architectures by name, and checkpoints that carry their own architecture spec."""

from kdsec.models.registry import (MODELS, ModelSpec, build_model, count_flops, count_parameters, load_checkpoint,
                                   save_checkpoint)

# Importing the architectures registers them.
from kdsec.models import students, teachers  # noqa: F401  isort:skip

__all__ = ["MODELS", "ModelSpec", "build_model", "count_flops", "count_parameters", "load_checkpoint", "save_checkpoint"]
