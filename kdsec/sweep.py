"""Distillation sweeps: a grid over temperature, α, loss and student width.

Plain functions only (no Prefect): ``sweep_grid`` expands the config's ``sweep`` section into
member configs, ``select_best`` picks by validation accuracy, ``comparison_table`` and
``pareto_plot`` produce the parent run's artifacts. The flow runs the members as parallel tasks.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

from kdsec.config import PipelineConfig, StudentConfig
from kdsec.fileio import write_atomic


@dataclass(frozen=True)
class SweepMember:
    name: str
    temperature: float
    alpha: float
    loss: str
    width: float  # multiplier of the configured student's widths

    def apply(self, config: PipelineConfig) -> PipelineConfig:
        """``config`` with this member's distillation settings and student width."""
        distill = config.distill.model_copy(update={"temperature": self.temperature, "alpha": self.alpha,
                                                    "loss": self.loss})
        return config.model_copy(update={"distill": distill, "student": scaled_student(config.student, self.width)})


@dataclass(frozen=True)
class MemberResult:
    member: SweepMember
    checkpoint: str
    val_accuracy: float
    test_accuracy: float
    params: int
    size_bytes: int
    flops: int
    train_seconds: float
    epochs_run: int

    def row(self) -> dict:
        return {**asdict(self.member), **{k: v for k, v in asdict(self).items() if k != "member"}}


def scaled_student(student: StudentConfig, factor: float) -> StudentConfig:
    """Every width of the student's arch (he_mlp hidden sizes, CNN channels and fc, ResNet width)
    × ``factor``, rounded, at least 1 (``scaled`` of its options class)."""
    if factor == 1.0:
        return student
    return student.scaled(factor)


def _label(value: float) -> str:
    return f"{value:g}"


def sweep_grid(config: PipelineConfig) -> list[SweepMember]:
    """The members of ``config.sweep``'s grid; an empty list keeps the base value. One member
    means no sweep."""
    sweep, distill = config.sweep, config.distill
    axes = (sweep.temperature or [distill.temperature], sweep.alpha or [distill.alpha],
            sweep.loss or [distill.loss], sweep.width or [1.0])
    members = []
    for temperature, alpha, loss, width in itertools.product(*axes):
        name = f"T{_label(temperature)}-a{_label(alpha)}-{loss}-w{_label(width)}"
        members.append(SweepMember(name, float(temperature), float(alpha), loss, float(width)))
    return members


def select_best(results: list[MemberResult]) -> MemberResult:
    """Highest validation accuracy; ties go to the smaller student, then to the grid order.
    (Test accuracy is never used to choose: it stays an unbiased estimate.)"""
    return max(results, key=lambda r: (r.val_accuracy, -r.params))


def pareto_front(results: list[MemberResult]) -> list[MemberResult]:
    """Members no other member beats on both size (params) and validation accuracy."""
    front = []
    for result in results:
        dominated = any(other.params <= result.params and other.val_accuracy >= result.val_accuracy
                        and (other.params < result.params or other.val_accuracy > result.val_accuracy)
                        for other in results)
        if not dominated:
            front.append(result)
    return sorted(front, key=lambda r: r.params)


def comparison_table(results: list[MemberResult], best: MemberResult) -> str:
    """A markdown table of every member, best first marked."""
    front = {r.member.name for r in pareto_front(results)}
    lines = ["| member | T | α | loss | width × | params | bytes | FLOPs | val acc | test acc | epochs | s | |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (-r.val_accuracy, r.params)):
        mark = "**best**" if r.member.name == best.member.name else ("Pareto" if r.member.name in front else "")
        lines.append(f"| {r.member.name} | {_label(r.member.temperature)} | {_label(r.member.alpha)} | "
                     f"{r.member.loss} | {_label(r.member.width)} | {r.params:,} | {r.size_bytes:,} | "
                     f"{r.flops:,} | {r.val_accuracy:.4f} | {r.test_accuracy:.4f} | {r.epochs_run} | "
                     f"{r.train_seconds:.1f} | {mark} |")
    return "\n".join(lines) + "\n"


def pareto_plot(results: list[MemberResult], best: MemberResult, path: Path) -> Path:
    """Validation accuracy against parameters (log scale), the Pareto front joined, best circled."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    front = pareto_front(results)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    losses = sorted({r.member.loss for r in results})
    for marker, loss in zip("os^Dv", losses):
        chosen = [r for r in results if r.member.loss == loss]
        axis.scatter([r.params for r in chosen], [r.val_accuracy for r in chosen], marker=marker, label=loss,
                     alpha=0.75)
    axis.plot([r.params for r in front], [r.val_accuracy for r in front], color="tab:red", lw=1,
              label="Pareto front")
    axis.scatter([best.params], [best.val_accuracy], s=220, facecolors="none", edgecolors="black",
                 label=f"best: {best.member.name}")
    if len({r.params for r in results}) > 1 and min(r.params for r in results) > 0:
        axis.set_xscale("log")
    axis.set_xlabel("student parameters")
    axis.set_ylabel("validation accuracy")
    axis.set_title(f"Distillation sweep: {len(results)} members")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return write_atomic(path, buffer.getvalue())
