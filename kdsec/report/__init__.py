"""The audit report: Markdown and one self-contained HTML file (plots inlined), both rendered
from one view of the summary (``view.build_view``)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402

from kdsec.fileio import write_atomic  # noqa: E402
from kdsec.report.plots import CAPTIONS, PLOTS, draw  # noqa: E402
from kdsec.report.view import METHOD_LABELS, ReportContext, build_view, metric_label, number  # noqa: E402
from kdsec.summary import Summary  # noqa: E402

_ENV = Environment(loader=PackageLoader("kdsec.report", "templates"), autoescape=select_autoescape(["html", "html.j2"]),
                   trim_blocks=True, lstrip_blocks=True)
_ENV.filters["md"] = lambda text: (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
                                   .replace(">", "&gt;"))  # a name from the user's data, in Markdown
_ENV.globals.update(zip=zip, metric_label=metric_label, number=number, method_labels=METHOD_LABELS)

__all__ = ["Report", "ReportContext", "render_report"]


@dataclass(frozen=True)
class Report:
    markdown: Path
    html: Path
    plots: dict[str, Path]


def render_report(summary: Summary, out_dir: Path, context: ReportContext | None = None) -> Report:
    """Write ``report.md`` (+ PNG plots beside it) and a self-contained ``report.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, inline = {}, {}
    for name in PLOTS:
        figure = draw(name, summary)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=150)
        plt.close(figure)
        plots[name] = out_dir / f"{name}.png"
        write_atomic(plots[name], buffer.getvalue())
        inline[name] = base64.b64encode(buffer.getvalue()).decode()
    sweep_plot = Path(summary.sweep.get("plot", "")) if summary.sweep else None
    if sweep_plot is not None and sweep_plot.is_file():  # the sweep's Pareto plot, inlined too
        inline["sweep_pareto"] = base64.b64encode(sweep_plot.read_bytes()).decode()
    figure = Path(summary.explanations.figure) if summary.explanations and summary.explanations.figure else None
    if figure is not None and figure.is_file():  # the attribution grid, beside the report and inlined
        plots["explanations"] = write_atomic(out_dir / "explanations.png", figure.read_bytes())
        inline["explanations"] = base64.b64encode(figure.read_bytes()).decode()
    view = build_view(summary, context)
    markdown = out_dir / "report.md"
    write_atomic(markdown, _ENV.get_template("report.md.j2").render(v=view, s=summary, plots=plots,
                                                                    captions=CAPTIONS))
    html = out_dir / "report.html"
    write_atomic(html, _ENV.get_template("report.html.j2").render(v=view, s=summary, images=inline,
                                                                  captions=CAPTIONS))
    return Report(markdown=markdown, html=html, plots=plots)
