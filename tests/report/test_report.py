"""The audit report as a reviewer reads it, rendered from a real run's summary.json (a default
digits run; its ROC arrays thinned to keep the file small): the banner in every outcome, the
warnings, warn-only gates, names, plots, and — in a real headless Chromium — no overflow at 1280 px."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from html import unescape
from pathlib import Path

import pytest

from kdsec.gates import CheckResult
from kdsec.report import ReportContext, render_report
from kdsec.summary import read_summary

FIXTURE = Path(__file__).parent / "fixtures" / "summary.json"
CONTEXT = ReportContext(created="2026-11-29 14:09 UTC", run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc",
                        version_url="http://127.0.0.1:5000/#/models/kdsec-student/versions/3",
                        ui_note="local store: open it with make mlflow-ui")


@pytest.fixture(scope="module")
def summary():
    """The run's summary; its attribution grid (a file of that run, not kept here) left out."""
    found = read_summary(FIXTURE)
    return found.model_copy(update={"explanations": found.explanations.model_copy(update={"figure": None})})


def _render(summary, tmp_path, **registry):
    if registry:
        summary = summary.model_copy(update={"registry": summary.registry.model_copy(update=registry),
                                             "promoted": registry.get("promoted", summary.promoted)})
    report = render_report(summary, tmp_path, CONTEXT)
    return report.html.read_text(), report.markdown.read_text()


def _failing(summary, gate="accuracy", value=0.93):
    gates = dict(summary.gates)
    first = gates[gate].checks[0]
    failed = CheckResult(**{**first.__dict__, "value": value, "passed": False, "level": "fail"})
    gates[gate] = gates[gate].model_copy(update={"verdict": "fail", "level": "fail",
                                                 "checks": [failed, *gates[gate].checks[1:]]})
    return summary.model_copy(update={"gates": gates, "verdict": "fail", "failed_gates": [gate], "promoted": False,
                                      "registry": summary.registry.model_copy(update={"promoted": False})})


def _banner(html: str) -> str:
    return unescape(re.search(r'<div class="banner (\w+)" role="status">(.*?)</div>', html, re.S).group(0))


def test_promoted_with_warnings_says_so_in_both_formats(summary, tmp_path):
    assert summary.warnings == ["candidate.membership_auc", "candidate.extraction_fidelity_top1"]
    html, markdown = _render(summary, tmp_path)
    banner = _banner(html)
    assert 'class="banner warn"' in banner and "PASSED — promoted: kdsec-student version 4 is now 'champion'" in banner
    assert "Passed with 2 warning(s)" in banner and "Membership-inference AUC (highest over attacks) 0.5752" in banner
    assert "PASSED — promoted: kdsec-student version 4 is now 'champion'" in markdown
    assert "2 check(s) passed but are past their warn level" in html and "past their warn level" in markdown
    # human names, the key on hover (HTML) and in a column (Markdown)
    assert '<abbr title="candidate.ece">Expected calibration error</abbr>' in html
    assert "| Calibration | Expected calibration error | `candidate.ece` | pass |" in markdown
    assert "run started <b>2026-11-29 14:09 UTC</b>" in html and CONTEXT.version_url in html and CONTEXT.run_url in html
    assert all(f'href="#{anchor}"' in html and f'id="{anchor}"' in html for anchor in ("gates", "plots", "lineage"))


def test_awaiting_review_names_the_version_alias_and_the_command(summary, tmp_path):
    html, markdown = _render(summary, tmp_path, promoted=False, awaiting_review=True, candidate_alias="candidate",
                             champion="3")
    banner = _banner(html)
    assert 'class="banner review"' in banner
    assert "awaiting review: kdsec-student version 4 holds 'candidate', not yet 'champion'" in banner
    assert "kdsec review approve 4" in banner and "'champion' stays at version 3" in banner
    assert "kdsec review approve 4" in markdown


def test_failed_run_names_the_failing_check_and_the_champion_that_stays(summary, tmp_path):
    html, markdown = _render(_failing(summary), tmp_path)
    banner = _banner(html)
    assert 'class="banner fail"' in banner and "FAILED — not promoted" in banner
    assert "Accuracy: Candidate test accuracy 0.9300 (needs >= 0.9500)" in banner
    assert "'champion' stays at version 3" in banner and "Also past a warn level" in banner
    assert "FAILED — not promoted" in markdown and '<tr class="fail">' in html


def test_superseded_run_says_by_which_version(summary, tmp_path):
    html, _ = _render(summary, tmp_path, promoted=False, superseded_by="5")
    assert "PASSED — not promoted: superseded by version 5" in _banner(html)


def _thresholds(summary, gate: str, threshold: float):
    """The summary with every check of ``gate`` failing at ``threshold``."""
    checks = [CheckResult(**{**check.__dict__, "threshold": threshold}) for check in summary.gates[gate].checks]
    return summary.model_copy(update={"gates": {**summary.gates,
                                                gate: summary.gates[gate].model_copy(update={"checks": checks})}})


def test_warn_only_gates_are_marked(summary, tmp_path):
    html, markdown = _render(_thresholds(summary, "membership", 1.0), tmp_path)
    assert "Warn-only gate(s):</b> Membership privacy" in html and "**Warn-only gate(s):** Membership privacy" in markdown
    assert html.count("warn-only</span>") == 2


def test_candidate_is_listed_once_and_plots_are_drawn_to_be_read(summary, tmp_path):
    html, markdown = _render(summary, tmp_path)
    membership = html.split('id="privacy"')[1].split("<h3>")[0]
    assert membership.count("★ candidate") == 1 and "<td>candidate</td>" not in membership
    assert html.count("data:image/png;base64") == 3 and 'href="roc.png"' in html
    for name in ("roc", "reliability", "accuracy_vs_size"):
        width, height = struct.unpack(">II", (tmp_path / f"{name}.png").read_bytes()[16:24])
        assert width == 900 and height >= 800  # 6 in at 150 dpi: crisp at ~560 px, full size on click
        assert f"]({name}.png)" in markdown


def test_the_attack_behind_each_membership_worst_case_is_named(summary, tmp_path):
    """RMIA has the highest AUC, LiRA (made stronger here) the highest TPR at low FPR: the gate
    table says which attack gave each value, the membership table marks both rows."""
    role = "variant:structured50_int8"  # the candidate, listed once as the variant it is
    audits = dict(summary.audit)
    for name in (role, "candidate"):
        attacks = dict(audits[name].attacks)
        attacks["lira"] = attacks["lira"].model_copy(update={"tpr_at_low_fpr": 0.03})
        audits[name] = audits[name].model_copy(update={"attacks": attacks})
    auc, tpr = summary.gates["membership"].checks
    checks = [CheckResult(**{**auc.__dict__, "source": "rmia"}),
              CheckResult(**{**tpr.__dict__, "value": 0.03, "source": "lira"})]
    gates = {**summary.gates, "membership": summary.gates["membership"].model_copy(update={"checks": checks})}
    html, markdown = _render(summary.model_copy(update={"audit": audits, "gates": gates}), tmp_path)
    assert "<td>0.5752 (rmia)</td>" in html and "<td>0.0300 (lira)</td>" in html
    assert "| 0.5752 (rmia) |" in markdown and "| 0.0300 (lira) |" in markdown
    membership = html.split('id="privacy"')[1].split("<h3>")[0]
    assert '<td class="l">rmia (highest AUC)</td>' in membership
    assert '<td class="l">lira (highest TPR)</td>' in membership
    assert "| rmia (highest AUC) |" in markdown and "| lira (highest TPR) |" in markdown


def test_per_class_table_has_models_as_rows(summary, tmp_path):
    html, markdown = _render(summary, tmp_path)
    assert "<h3>Per-class test accuracy</h3>" in html
    header = re.search(r"<tr><th>model \\ class</th>(.*?)</tr>", html).group(1)
    assert header.count("<th>") == 10
    assert "| model \\ class | 0 | 1 |" in markdown


@pytest.mark.parametrize("width", [1280, 1400])
def test_nothing_overflows_in_a_real_browser(summary, tmp_path, width):
    """Chromium lays the report out at ``width`` px: the page does not scroll sideways and no table
    needs its own scrollbar. Never skipped: ``make test`` installs Chromium where it is missing."""
    assert shutil.which("chromium"), "Debian's chromium is not installed: make test (or make chromium) installs it"
    html, _ = _render(summary, tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>document.body.dataset.overflow = String("
                                  "document.documentElement.scrollWidth - document.documentElement.clientWidth);"
                                  "document.body.dataset.scrolled = String([...document.querySelectorAll('.scroll')]"
                                  ".filter(e => e.scrollWidth > e.clientWidth).length);</script></body>"))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert int(re.search(r'data-overflow="(-?\d+)"', dom).group(1)) <= 0
    assert re.search(r'data-scrolled="(\d+)"', dom).group(1) == "0"


def test_values_from_the_run_are_escaped(summary, tmp_path):
    """A dataset's name and class names come from files a user supplied: markup in them is text."""
    hostile = "<img src=x onerror=alert(1)>|"
    data = summary.data.model_copy(update={"name": hostile})
    html, markdown = _render(summary.model_copy(update={"data": data}), tmp_path)
    assert hostile not in html and "&lt;img src=x onerror=alert(1)&gt;|" in html
    assert hostile not in markdown and "&lt;img src=x onerror=alert(1)&gt;\\|" in markdown


def test_explanations_section_lists_every_model_once_with_intervals(summary, tmp_path):
    explanations = summary.explanations
    assert explanations is not None and explanations.method == "saliency"
    html, markdown = _render(summary, tmp_path)
    section = unescape(html.split('<h2 id="explanations">')[1].split("<h2 ")[0])
    assert 'href="#explanations"' in html and "<h3>Saliency (gated)</h3>" in section
    candidate = explanations.candidate.methods["saliency"]
    assert f"{candidate.spearman:.3f}" in section and section.count("★ candidate") == len(explanations.methods)
    assert "maps from variant:structured50 (float source)" in section and explanations.he_note in section
    assert "## Explanations" in markdown and "### Saliency (gated)" in markdown
    figure = tmp_path / "attributions.png"  # the grid travels with the report (inlined, and beside it)
    figure.write_bytes(_png())
    report = render_report(summary.model_copy(update={"explanations": explanations.model_copy(
        update={"figure": str(figure)})}), tmp_path / "out", CONTEXT)
    assert (tmp_path / "out" / "explanations.png").read_bytes() == figure.read_bytes()
    assert report.html.read_text().count("data:image/png;base64") == 4 and "](explanations.png)" in report.markdown.read_text()


def _png() -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.figure(figsize=(1, 1)).savefig(buffer, format="png")
    plt.close("all")
    return buffer.getvalue()


def test_a_spearman_gate_at_zero_can_still_fail_so_it_is_not_warn_only(summary, tmp_path):
    html, _ = _render(_thresholds(summary, "explanation", 0.0), tmp_path)
    assert "Warn-only gate(s)" not in html


def test_without_homomorphic_inference_the_explanations_do_not_claim_it(summary, tmp_path):
    he = summary.he.model_copy(update={"enabled": False, "runs": [], "agreement": None})
    html, markdown = _render(summary.model_copy(update={"he": he}), tmp_path)
    assert summary.explanations.he_note not in unescape(html) and "Homomorphic inference is off in this run." in html
    assert "Homomorphic (CKKS): <b>off</b>" in html and "Homomorphic (CKKS): **off**" in markdown
