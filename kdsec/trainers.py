"""The stages that produce trained models: the teacher, the scratch and DP-SGD students, the
distilled student (one, or each member of a sweep) and the teacher's stored signals.

Each takes the config, the data bundle and a checkpoint path, and returns a ``TrainedModel``:
what was trained, where its weights are, and what it scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kdsec import roles
from kdsec.config import PipelineConfig, TrainConfig
from kdsec.data import DataBundle
from kdsec.distill import OfflineDistiller
from kdsec.models import ModelSpec, build_model, count_flops, count_parameters, load_checkpoint, save_checkpoint
from kdsec.sweep import MemberResult, SweepMember
from kdsec.train import evaluate, fit, seed_everything


@dataclass(frozen=True)
class TrainedModel:
    role: str
    checkpoint: str
    spec_json: str
    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    params: int
    train_seconds: float
    history: list[dict[str, float]] = field(repr=False, default_factory=list)
    privacy: dict[str, float | str] = field(default_factory=dict)  # DP-SGD accounting (ε, δ, noise), if any

    def load(self):
        return load_checkpoint(Path(self.checkpoint))[0]

    def metrics(self) -> dict[str, float]:
        """What its tracking run records at the end (the per-epoch history is logged by step)."""
        return {"test_accuracy": self.test_accuracy, "best_val_accuracy": self.val_accuracy,
                "params": float(self.params), "train_seconds": self.train_seconds}


def teacher_spec(config: PipelineConfig, bundle: DataBundle) -> ModelSpec:
    return ModelSpec(config.teacher.arch, bundle.input_shape, bundle.num_classes, config.teacher.model_options())


def student_spec(config: PipelineConfig, bundle: DataBundle) -> ModelSpec:
    return ModelSpec(config.student.arch, bundle.input_shape, bundle.num_classes, config.student.model_options())


def _result(role: str, model, spec: ModelSpec, bundle: DataBundle, checkpoint: Path, fitted, seconds: float,
            privacy: dict[str, float | str] | None = None) -> TrainedModel:
    save_checkpoint(model, spec, checkpoint)
    return TrainedModel(
        role=role, checkpoint=str(checkpoint), spec_json=spec.to_json(),
        test_accuracy=evaluate(model, bundle.x_test, bundle.y_test)[1],
        val_accuracy=fitted.best_val_accuracy, best_epoch=fitted.best_epoch, epochs_run=fitted.epochs_run,
        params=count_parameters(model)[0], train_seconds=seconds, history=fitted.history, privacy=privacy or {},
    )


def _train(role: str, spec: ModelSpec, bundle: DataBundle, train: TrainConfig, seed: int, checkpoint: Path,
           objective=None, split: str = "train") -> TrainedModel:
    seed_everything(seed)
    model = build_model(spec)
    started = time.perf_counter()
    kwargs = {"objective": objective} if objective is not None else {}
    x_train, y_train = bundle.split(split)
    fitted = fit(model, x_train, y_train, bundle.x_val, bundle.y_val, train, seed=seed, label=role, **kwargs)
    return _result(role, model, spec, bundle, checkpoint, fitted, time.perf_counter() - started)


def train_teacher(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    return _train(roles.TEACHER, teacher_spec(config, bundle), bundle, config.teacher.train, config.seed,
                  checkpoint)


def train_scratch_student(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    """The student architecture trained on hard labels alone: the baseline KD must beat."""
    return _train(roles.SCRATCH_STUDENT, student_spec(config, bundle), bundle, config.student.train, config.seed,
                  checkpoint)


def train_dp_student(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    """The student architecture trained with DP-SGD on the training split's hard labels
    (``student.dp``); its ε is what the accountant reports, not the target."""
    from kdsec.dp_sgd import fit_private

    spec = student_spec(config, bundle)
    seed_everything(config.seed)
    model = build_model(spec)
    started = time.perf_counter()
    fitted = fit_private(model, bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, config.student.dp,
                         label=roles.DP_STUDENT)
    return _result(roles.DP_STUDENT, model, spec, bundle, checkpoint, fitted, time.perf_counter() - started,
                   fitted.as_dict())


def distiller_for(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel | None,
                  signals: str | Path | None = None) -> OfflineDistiller:
    """The teacher's signals on the distillation split (``distill.transfer_set``): read from the
    stored file when given, else computed once here from ``teacher``."""
    if signals is not None:
        return OfflineDistiller.load(Path(signals), config.distill)
    return OfflineDistiller(teacher.load(), bundle.split(config.distill.transfer_set)[0], config.distill)


def store_teacher_signals(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel, path: Path) -> str:
    """Compute the teacher's logits (and the feature target of a feature loss) on the transfer
    split once and store them as safetensors, for every student that distils from them."""
    return str(distiller_for(config, bundle, teacher).save(path))


def distill_student(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel | None, checkpoint: Path,
                    signals: str | Path | None = None, role: str = roles.KD_STUDENT) -> TrainedModel:
    return _train(role, student_spec(config, bundle), bundle, config.student.train, config.seed,
                  checkpoint, objective=distiller_for(config, bundle, teacher, signals).objective,
                  split=config.distill.transfer_set)


def distill_member(config: PipelineConfig, bundle: DataBundle, member: SweepMember, signals: str | Path,
                   checkpoint: Path, torch_threads: int = 0) -> tuple[TrainedModel, MemberResult]:
    """One sweep member: the student at ``member``'s width distilled with its T/α/loss from the
    stored teacher signals (the teacher itself is never run)."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    trained = distill_student(member.apply(config), bundle, None, checkpoint, signals,
                              role=roles.sweep_member(member.name))
    result = MemberResult(member=member, checkpoint=trained.checkpoint, val_accuracy=trained.val_accuracy,
                          test_accuracy=trained.test_accuracy, params=trained.params,
                          size_bytes=Path(checkpoint).stat().st_size,
                          flops=count_flops(build_model(ModelSpec.from_json(trained.spec_json)), bundle.input_shape),
                          train_seconds=trained.train_seconds, epochs_run=trained.epochs_run)
    return trained, result
