"""Distillation: losses by name (one small module each) and the distiller that applies them."""

from kdsec.distill.distiller import DistillObjective, OfflineDistiller, signals_key
from kdsec.distill.base import LOSSES, DistillLoss

# Importing the losses registers them.
from kdsec.distill import attention, fitnets, kd  # noqa: F401  isort:skip

__all__ = ["LOSSES", "DistillLoss", "DistillObjective", "OfflineDistiller", "signals_key"]
