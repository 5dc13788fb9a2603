"""Offline distillation: the teacher's signals (logits, and the feature target of a feature loss)
are computed once on the transfer set; every student epoch — and every student of a sweep —
reuses them, with no teacher forward pass during training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from kdsec.config import DistillConfig
from kdsec.distill.features import Tap, capture, read_feature, resolve_tap, teacher_signals
from kdsec.distill.base import LOSSES, DistillLoss
from kdsec.errors import IntegrityError
from kdsec.fileio import PRIVATE, write_atomic


class DistillObjective(nn.Module):
    """``objective(student, inputs, targets, batch_indices)`` for ``kdsec.train.fit``. Its own
    parameters (a learned projection, if the loss has one) are created by ``bind`` and trained
    with the student."""

    def __init__(self, loss: DistillLoss, signals: dict[str, torch.Tensor], student_layer: str) -> None:
        super().__init__()
        self.loss = loss
        self.signals = signals
        self.student_layer = student_layer
        self.tap: Tap | None = None
        self.projector: nn.Module | None = None

    def bind(self, student: nn.Module, sample: torch.Tensor) -> list[nn.Parameter]:
        if self.loss.feature is not None:
            self.tap = resolve_tap(student, self.student_layer, self.loss.feature, sample[:2], "student")
            feature = read_feature(student, self.tap, sample[:2])
            self.projector = self.loss.projector(feature.cpu(), self.signals["feature"][:2])
            if self.projector is not None:
                self.projector.to(sample.device)
        return list(self.parameters())

    def forward(self, student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                batch_indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_logits = self.signals["logits"].to(inputs.device)[batch_indices]
        if self.tap is None:
            return self.loss(student(inputs), teacher_logits, targets)
        with capture(student, self.tap) as store:
            logits = student(inputs)
        teacher_target = self.signals["feature"].to(inputs.device)[batch_indices]
        return self.loss(logits, teacher_logits, targets, store["feature"], teacher_target, self.projector)


class OfflineDistiller:
    """Owns the teacher/student semantics: the teacher is frozen in eval mode, runs once on the
    transfer set, and never receives gradients; ``objective`` plugs into ``kdsec.train.fit``."""

    def __init__(self, teacher: nn.Module | None, transfer_inputs: np.ndarray | None, config: DistillConfig,
                 signals: dict[str, torch.Tensor] | None = None) -> None:
        self.config = config
        self.loss = LOSSES.get(config.loss)(config)
        if signals is None:
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)
            tap = None
            if self.loss.feature is not None:
                sample = torch.as_tensor(transfer_inputs[:2]).to(next(teacher.parameters()).device)
                tap = resolve_tap(teacher, config.teacher_layer, self.loss.feature, sample, "teacher")
            signals = teacher_signals(teacher, transfer_inputs, tap, self.loss.teacher_target)
        if self.loss.feature is not None and "feature" not in signals:
            raise IntegrityError(f"stored teacher signals have no feature target for distill.loss '{config.loss}'")
        self.signals = signals

    @property
    def teacher_logits(self) -> torch.Tensor:
        return self.signals["logits"]

    @property
    def objective(self) -> DistillObjective:
        """A fresh objective (its own projection, if any) for one student."""
        return DistillObjective(self.loss, self.signals, self.config.student_layer)

    def save(self, path: Path) -> Path:
        """Owner-only (0600): the teacher's outputs on its training rows leak membership like its weights."""
        return write_atomic(path, save({name: tensor.contiguous() for name, tensor in self.signals.items()},
                                       metadata={"kdsec.distill": self.config.model_dump_json()}), mode=PRIVATE)

    @classmethod
    def load(cls, path: Path, config: DistillConfig) -> OfflineDistiller:
        """Stored signals, reused with ``config``'s T/α/weight (they do not change the teacher's side)."""
        try:
            signals = load_file(str(path))
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"teacher signals '{path}' cannot be read ({exc})") from None
        return cls(None, None, config, signals)


def signals_key(config: DistillConfig) -> str:
    """What the teacher's stored side depends on: the loss's feature kind, target and layer."""
    loss = LOSSES.get(config.loss)
    if loss.feature is None:
        return "logits"
    return f"{config.loss}:{config.teacher_layer}"
