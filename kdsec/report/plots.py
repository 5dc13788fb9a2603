"""The report's plots, drawn to be read at the size the report shows them (about 560 px wide,
11 pt text) and saved at twice that for opening full size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdsec import roles  # noqa: E402
from kdsec.gates import Gate, Metric  # noqa: E402
from kdsec.report.view import once  # noqa: E402
from kdsec.summary import Summary  # noqa: E402

STYLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9.5, "axes.grid": True, "grid.alpha": 0.3}
CANDIDATE_STYLE = {"color": "black", "linewidth": 2.6, "zorder": 5}
MIN_BIN = 5  # reliability bins with fewer test samples are drawn hollow: their accuracy is noise


def _threshold(summary: Summary, gate: str, metric: str) -> float | None:
    verdict = summary.gates.get(gate)
    check = next((c for c in verdict.checks if c.metric == metric), None) if verdict else None
    return check.threshold if check else None


def _audited(summary: Summary) -> list[str]:
    """Each audited model once: the candidate is the variant it was selected from."""
    return once(summary.audit, roles.variant_role(summary.candidate.variant))


def roc_plot(summary: Summary) -> plt.Figure:
    """Log-log ROC of each model's strongest attack (the low-FPR corner is where leakage shows),
    the candidate in bold black, the legend under the axes."""
    candidate = roles.variant_role(summary.candidate.variant)
    figure, axis = plt.subplots(figsize=(6, 6.2))
    colours = plt.get_cmap("tab10").colors
    for index, role in enumerate(_audited(summary)):
        membership = summary.audit[role].membership
        points = [(f, t) for f, t in zip(membership.roc_fpr, membership.roc_tpr) if f > 0 and t > 0]
        if not points:
            continue
        label = f"{role}: {membership.attack}, AUC {membership.auc:.3f}"
        style = CANDIDATE_STYLE if role == candidate else {"color": colours[index % 10], "linewidth": 1.3,
                                                           "linestyle": ("-", "--", ":", "-.")[index % 4]}
        axis.plot(*zip(*points), label=("★ candidate " + label) if role == candidate else label, **style)
    axis.plot([1e-3, 1], [1e-3, 1], color="grey", linestyle=(0, (1, 3)), linewidth=1, label="chance")
    low_fpr = summary.candidate_audit.membership.low_fpr
    axis.axvline(low_fpr, color="tab:red", linewidth=0.8, alpha=0.6)
    axis.text(low_fpr, 1.1e-3, f" gate FPR {low_fpr:g}", color="tab:red", fontsize=9, rotation=90, va="bottom")
    axis.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false-positive rate",
             ylabel="true-positive rate", title="Membership inference, strongest attack per model")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    return figure


def reliability_plot(summary: Summary) -> plt.Figure:
    """Reliability of the teacher and the candidate, with how many test samples each bin holds."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(6, 6.2), sharex=True, height_ratios=(3, 1.2))
    width = None
    for role, colour, offset in ((roles.TEACHER, "tab:blue", -0.25), (roles.CANDIDATE, "black", 0.25)):
        bins = summary.audit[role].calibration
        tally = list(getattr(bins, "bin_count", None) or [0] * len(bins.bin_confidence))
        width = 1 / max(len(tally), 1)
        full = [(c, a) for c, a, n in zip(bins.bin_confidence, bins.bin_accuracy, tally)
                if c is not None and c == c and n >= MIN_BIN]
        sparse = [(c, a) for c, a, n in zip(bins.bin_confidence, bins.bin_accuracy, tally)
                  if c is not None and c == c and 0 < n < MIN_BIN]
        name = "candidate" if role == roles.CANDIDATE else role
        if full:
            axis.plot(*zip(*full), "o-", color=colour, label=f"{name} (ECE {bins.ece:.3f})")
        if sparse:
            axis.plot(*zip(*sparse), "o", color=colour, markerfacecolor="white",
                      label=f"{name}: bins under {MIN_BIN} samples")
        centres = [(i + 0.5) * width + offset * width * 0.8 for i in range(len(tally))]
        bars = counts.bar(centres, tally, width=width * 0.4, color=colour, alpha=0.75, label=name)
        counts.bar_label(bars, labels=[str(n) if n else "" for n in tally], fontsize=7, padding=1, rotation=90)
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    axis.set(ylabel="accuracy", title="Reliability diagram (test split)", xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(loc="upper left", fontsize=8.5)
    counts.set(xlabel="confidence", ylabel="samples per bin", yscale="log")
    counts.margins(y=0.35)
    return figure


def size_plot(summary: Summary) -> plt.Figure:
    """Accuracy against bytes on disk, each variant its own marker (a legend, no overlapping
    labels), the accuracy gate's two limits drawn, the candidate a large star."""
    figure, axis = plt.subplots(figsize=(6, 6.2))
    markers = "osD^vP<>Xh"
    colours = plt.get_cmap("tab10").colors
    for index, variant in enumerate(summary.variants):
        chosen = variant["name"] == summary.candidate.variant
        axis.scatter(variant["size_bytes"] / 1024, variant["test_accuracy"] * 100,
                     s=320 if chosen else 70, marker="*" if chosen else markers[index % len(markers)],
                     color="black" if chosen else colours[index % 10], zorder=5 if chosen else 3,
                     label=("★ candidate: " if chosen else "") + variant["name"])
    teacher = summary.models[roles.TEACHER].test_accuracy * 100
    axis.axhline(teacher, color="grey", linestyle=":", label=f"teacher {teacher:.2f} %")
    minimum = _threshold(summary, Gate.ACCURACY, Metric.TEST_ACCURACY)
    if minimum is not None:
        axis.axhline(minimum * 100, color="tab:red", linestyle="--", label=f"accuracy gate ≥ {minimum * 100:.1f} %")
    drop = _threshold(summary, Gate.ACCURACY, Metric.ACCURACY_DROP)
    if drop is not None:
        axis.axhline(teacher - drop * 100, color="tab:orange", linestyle="--",
                     label=f"gate: at most {drop * 100:.1f} points under the teacher")
    axis.set(xlabel="serialized size (KiB)", ylabel="test accuracy (%)", title="Accuracy vs size on disk")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return figure


PLOTS = {"accuracy_vs_size": size_plot, "roc": roc_plot, "reliability": reliability_plot}
CAPTIONS = {"accuracy_vs_size": "Accuracy against size: every compressed variant, the gate's limits, the candidate",
            "roc": "Membership-inference ROC (log-log): leakage shows at low false-positive rates",
            "reliability": "Reliability: confidence against accuracy, with samples per bin"}


def draw(name: str, summary: Summary) -> plt.Figure:
    with plt.rc_context(STYLE):
        figure = PLOTS[name](summary)
        figure.tight_layout()
    return figure
