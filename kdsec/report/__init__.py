"""The audit report: Markdown and one self-contained HTML file (plots inlined), from the summary."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402

from kdsec import roles  # noqa: E402
from kdsec.fileio import write_atomic  # noqa: E402
from kdsec.summary import Summary  # noqa: E402

_ENV = Environment(loader=PackageLoader("kdsec.report", "templates"), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)
_ENV.globals["zip"] = zip


@dataclass(frozen=True)
class Report:
    markdown: Path
    html: Path
    plots: dict[str, Path]


def _roc_plot(summary: Summary) -> plt.Figure:
    """Log-log ROC of each model's strongest attack: the low-FPR corner is where leakage shows."""
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for role, audit in summary.audit.items():
        if role == roles.CANDIDATE:
            continue
        membership = audit.membership
        points = [(f, t) for f, t in zip(membership.roc_fpr, membership.roc_tpr) if f > 0 and t > 0]
        if points:
            axis.plot(*zip(*points), label=f"{role} ({membership.attack}, AUC {membership.auc:.3f})")
    axis.plot([1e-3, 1], [1e-3, 1], "k--", linewidth=0.8, label="chance")
    axis.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false-positive rate",
             ylabel="true-positive rate", title="Membership inference ROC (strongest attack, log-log)")
    axis.legend(fontsize=7)
    return figure


def _reliability_plot(summary: Summary) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for role in (roles.TEACHER, roles.CANDIDATE):
        bins = summary.audit[role].calibration
        points = [(c, a) for c, a in zip(bins.bin_confidence, bins.bin_accuracy) if c is not None and c == c]
        axis.plot(*zip(*points), "o-", label=f"{role} (ECE {bins.ece:.3f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    axis.set(xlabel="confidence", ylabel="accuracy", title="Reliability diagram (test split)")
    axis.legend(fontsize=8)
    return figure


def _size_plot(summary: Summary) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for variant in summary.variants:
        chosen = variant["name"] == summary.candidate.variant
        axis.scatter(variant["size_bytes"] / 1024, variant["test_accuracy"] * 100, s=80 if chosen else 40,
                     marker="*" if chosen else "o")
        axis.annotate(variant["name"] + (" (candidate)" if chosen else ""),
                      (variant["size_bytes"] / 1024, variant["test_accuracy"] * 100), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
    teacher = summary.models[roles.TEACHER].test_accuracy * 100
    axis.axhline(teacher, color="grey", linestyle=":", label=f"teacher {teacher:.1f}%")
    axis.set(xlabel="serialized size (KiB)", ylabel="test accuracy (%)", title="Accuracy vs size")
    axis.legend(fontsize=8)
    return figure


PLOTS = {"roc": _roc_plot, "reliability": _reliability_plot, "accuracy_vs_size": _size_plot}


def render_report(summary: Summary, out_dir: Path) -> Report:
    """Write ``report.md`` (+ PNG plots beside it) and a self-contained ``report.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, inline = {}, {}
    for name, draw in PLOTS.items():
        figure = draw(summary)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        plots[name] = out_dir / f"{name}.png"
        write_atomic(plots[name], buffer.getvalue())
        inline[name] = base64.b64encode(buffer.getvalue()).decode()
    sweep_plot = Path(summary.sweep.get("plot", "")) if summary.sweep else None
    if sweep_plot is not None and sweep_plot.is_file():  # the sweep's Pareto plot, inlined too
        inline["sweep_pareto"] = base64.b64encode(sweep_plot.read_bytes()).decode()
    markdown = out_dir / "report.md"
    write_atomic(markdown, _ENV.get_template("report.md.j2").render(s=summary, plots=plots))
    html = out_dir / "report.html"
    write_atomic(html, _ENV.get_template("report.html.j2").render(s=summary, images=inline))
    return Report(markdown=markdown, html=html, plots=plots)
