"""Architectures by name (``catalog``), their specs and costs (``spec``), and checkpoints that
carry their own architecture spec (``checkpoint``)."""

from kdsec.models.catalog import MODELS, build_model
from kdsec.models.checkpoint import load_checkpoint, read_kdsec_file, save_checkpoint
from kdsec.models.spec import ModelSpec, count_flops, count_parameters, has_conv

# Importing the architectures registers them.
from kdsec.models import students, teachers  # noqa: F401  isort:skip

__all__ = ["MODELS", "ModelSpec", "build_model", "count_flops", "count_parameters", "has_conv",
           "load_checkpoint", "read_kdsec_file", "save_checkpoint"]
