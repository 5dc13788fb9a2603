"""Where to put the extraction and calibration gates: the two gate metrics measured on digits for
the default pipeline's candidate and for models those gates exist to stop.

* ``candidate.extraction_fidelity_top1``: agreement, on the audit holdout, between the victim and
  a knockoff copy trained on its top-1 answers to ``audit.extraction_queries`` population queries
  (``kdsec.audit_run.extraction_audit``, as the pipeline runs it);
* ``candidate.ece``: expected calibration error on the test split (``kdsec.audit.trust.calibration``).

Rows: the default config's candidate (teacher → KD student → pruned/quantized variants → the
selected one, as the flow does) over 5 seeds; then reference models: trivially extractable (a
constant answer, a near-constant one), low-capacity (linear, one hidden unit), over-confident
(students overfit to 20 or 50 images, logits × 10) and under-confident (the default KD student,
logits ÷ 2, 3, 10). The last two columns are the gate levels under ``GatesConfig()``.

    uv run --frozen python benchmarks/gate_defaults.py      (~1 min on 2 idle cores, ~4 on busy ones)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from kdsec import trainers
from kdsec.audit import run as audit_run
from kdsec.compress import candidates
from kdsec.audit.trust import calibration
from kdsec.config import GatesConfig, PipelineConfig, load_config
from kdsec.data import DataBundle, prepare_data
from kdsec.gates import evaluate_gates
from kdsec.models import ModelSpec, build_model
from kdsec.train import fit, predict_logits, seed_everything

SEEDS = (0, 1, 2, 3, 4)


class ScaledLogits(nn.Module):
    """``model``'s logits times ``factor``: the same top-1 answers at another confidence."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


class FewAnswers(nn.Module):
    """Answers ``default`` to everything, except inputs ``model`` puts in one of the ``kept``
    classes, which keep that answer; every answer at softmax confidence ``confidence``."""

    def __init__(self, num_classes: int, default: int, kept: tuple[int, ...] = (), model: nn.Module | None = None,
                 confidence: float = 0.9) -> None:
        super().__init__()
        self.num_classes, self.default, self.model = num_classes, default, model
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long))
        self.margin = float(np.log(confidence * (num_classes - 1) / (1 - confidence)))

    def forward(self, x):
        labels = torch.full((len(x),), self.default, dtype=torch.long)
        if self.model is not None:
            predicted = self.model(x).argmax(1)
            keep = torch.isin(predicted, self.kept)
            labels[keep] = predicted[keep]
        return F.one_hot(labels, self.num_classes).float() * self.margin


def pipeline_candidate(config: PipelineConfig, bundle: DataBundle, folder: Path) -> tuple[str, nn.Module, nn.Module]:
    """(variant name, candidate, dense KD student) as the flow produces them."""
    teacher = trainers.train_teacher(config, bundle, folder / "teacher.safetensors")
    student = trainers.distill_student(config, bundle, teacher, folder / "kd_student.safetensors")
    variants = candidates.compress_student(config.compress, bundle, student, config.student.train, config.seed, folder,
                                       trainers.distiller_for(config, bundle, teacher).objective,
                                       config.distill.transfer_set)
    candidate = candidates.select_candidate(variants, teacher.val_accuracy, config.gates, config.compress.selection)
    return candidate.name, candidates.load_variant(candidate), student.load()


def gate_values(model: nn.Module, config: PipelineConfig, bundle: DataBundle) -> tuple[float, float, float]:
    """(test accuracy, top-1 extraction fidelity, ECE): what the extraction and calibration gates read."""
    logits = predict_logits(model.cpu(), bundle.x_test)
    top1 = next(r for r in audit_run.extraction_audit(config, bundle, model) if r.defense == "top1")
    return float((logits.argmax(1) == bundle.y_test).mean()), top1.fidelity, calibration(logits, bundle.y_test).ece


def gate_levels(fidelity: float, ece: float, gates: GatesConfig) -> tuple[str, str]:
    """The extraction and calibration gates' levels (pass / warn / fail) for these two values."""
    metrics = {"candidate.extraction_fidelity_top1": fidelity, "candidate.ece": ece}
    levels = {verdict.name: verdict.level for verdict in evaluate_gates(metrics, gates)}
    return levels["extraction"], levels["calibration"]


def trained_student(config: PipelineConfig, bundle: DataBundle, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
                    epochs: int, overfit: bool = False) -> nn.Module:
    """``spec`` trained with cross-entropy on (x, y); ``overfit``: no early stopping (validated
    on its own training data)."""
    seed_everything(config.seed)
    model = build_model(spec)
    train = config.student.train.model_copy(update={"epochs": epochs, "patience": epochs})
    fit(model, x, y, *((x, y) if overfit else (bundle.x_val, bundle.y_val)), train, seed=config.seed,
        label="reference")
    return model


def reference_models(config: PipelineConfig, bundle: DataBundle, student: nn.Module) -> dict[str, nn.Module]:
    """Models the two gates exist to stop, and low-capacity ones for contrast; ``student`` is the
    default dense KD student."""
    spec = trainers.student_spec(config, bundle)

    def student_with(hidden: list[int]) -> nn.Module:
        return trained_student(config, bundle, ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                                                         {"hidden": hidden}), bundle.x_train, bundle.y_train, 60)

    def overfit(per_class: int) -> nn.Module:
        subset = np.concatenate([np.flatnonzero(bundle.y_train == label)[:per_class]
                                 for label in range(bundle.num_classes)])
        return trained_student(config, bundle, spec, bundle.x_train[subset], bundle.y_train[subset], 200,
                               overfit=True)

    return {
        "constant answer (class 0)": FewAnswers(bundle.num_classes, 0),
        "near-constant: 0 unless the KD student says 1": FewAnswers(bundle.num_classes, 0, (1,), student),
        "linear student (he_mlp, hidden [])": student_with([]),
        "one-unit student (he_mlp, hidden [1])": student_with([1]),
        "overfit to 20 images, logits × 10": ScaledLogits(overfit(2), 10.0),
        "overfit to 50 images, logits × 10": ScaledLogits(overfit(5), 10.0),
        "KD student (seed 0, dense)": student,
        "KD student, logits × 10": ScaledLogits(student, 10.0),
        "KD student, logits ÷ 2": ScaledLogits(student, 0.5),
        "KD student, logits ÷ 3": ScaledLogits(student, 1 / 3),
        "KD student, logits ÷ 10": ScaledLogits(student, 0.1),
    }


def main() -> None:
    console = Console(width=150)
    folder = Path(tempfile.mkdtemp(prefix="kdsec-gates-"))
    started = time.perf_counter()
    config = load_config(None, [])
    bundle = prepare_data(config.data)
    gates = GatesConfig()
    rows: list[tuple[str, float, float, float]] = []
    students = []
    with console.status(f"default pipeline candidate × {len(SEEDS)} seeds (teacher, KD student, compression, "
                        "extraction)"):
        for seed in SEEDS:
            seeded = load_config(None, [f"seed={seed}"])
            name, candidate, student = pipeline_candidate(seeded, bundle, folder / f"seed{seed}")
            rows.append((f"default candidate, seed {seed} ({name})", *gate_values(candidate, seeded, bundle)))
            students.append(student)
    defaults = [row[1:] for row in rows]
    with console.status("reference models"):
        # The same attacker (seed 0 config): scaling logits changes ECE, not the top-1 answers it copies.
        for name, model in reference_models(config, bundle, students[0]).items():
            rows.append((name, *gate_values(model, config, bundle)))

    table = Table(title=f"Extraction and calibration gate metrics on digits: knockoff on "
                        f"{config.audit.extraction_queries} {config.audit.extraction_source} queries (top-1 answers), fidelity on the "
                        f"{len(bundle.y_holdout)}-image holdout; ECE on the {len(bundle.y_test)}-image test split")
    table.add_column("model")
    for column in ("test acc", "extraction fidelity (top1)", "ECE", "extraction gate", "calibration gate"):
        table.add_column(column, justify="right")
    for index, (name, acc, fidelity, ece) in enumerate(rows):
        table.add_row(name, f"{acc:.4f}", f"{fidelity:.4f}", f"{ece:.4f}", *gate_levels(fidelity, ece, gates),
                      end_section=index == len(SEEDS) - 1)
    table.add_section()
    columns = list(zip(*defaults))
    table.add_row(f"[bold]default candidate, mean ± sd ({len(SEEDS)} seeds)[/bold]",
                  *(f"{statistics.mean(c):.4f} ± {statistics.stdev(c):.4f}" for c in columns), "", "")
    table.add_row("[bold]default candidate, min – max[/bold]", *(f"{min(c):.4f} – {max(c):.4f}" for c in columns),
                  *gate_levels(max(columns[1]), max(columns[2]), gates))
    console.print(table)
    console.print(f"GatesConfig(): max_extraction_fidelity {gates.max_extraction_fidelity} (warn "
                  f"{gates.warn_extraction_fidelity}), max_ece {gates.max_ece} (warn {gates.warn_ece}); "
                  f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
