"""Distillation: losses by name (one small module each) and the distiller that applies them."""

from kdsec.distill.distiller import OfflineDistiller
from kdsec.distill.registry import LOSSES

# Importing the losses registers them.
from kdsec.distill import kd  # noqa: F401  isort:skip

__all__ = ["LOSSES", "OfflineDistiller"]
