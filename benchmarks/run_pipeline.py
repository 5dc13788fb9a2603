"""Wall time of `kdsec run` cold (empty working dir and Prefect home) and warm (cached teacher and
reference models); the audit's cost relative to teacher training; LOSS vs RMIA vs LiRA per model.

    uv run python benchmarks/run_pipeline.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_once(workdir: Path, env: dict[str, str]) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kdsec.cli", "run"], cwd=workdir, env=env,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 2):
        sys.exit(f"kdsec run failed: {result.stderr.strip()}")
    path = next(line.split("summary:", 1)[1].strip() for line in result.stdout.splitlines()
                if line.startswith("summary:"))
    return elapsed, json.loads((workdir / path).read_text())


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kdsec-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "COLUMNS": "200",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    cold, cold_summary = run_once(workdir, env)
    warm, warm_summary = run_once(workdir, env)
    table = Table(title="kdsec run on digits (2-core CPU)")
    for column in ("run", "wall s", "ratio to cold", "teacher cache", "teacher acc", "KD acc", "candidate",
                   "HE ms/sample", "audit s", "audit / teacher train", "verdict"):
        table.add_column(column)
    for name, seconds, summary in (("cold", cold, cold_summary), ("warm", warm, warm_summary)):
        table.add_row(name, f"{seconds:.1f}", f"{seconds / cold:.2f}", summary["teacher_cache"],
                      f"{summary['models']['teacher']['test_accuracy']:.4f}",
                      f"{summary['models']['kd_student']['test_accuracy']:.4f}",
                      f"{summary['candidate']['variant']} {summary['candidate']['test_accuracy']:.4f}",
                      f"{summary['he']['ms_per_sample']:.2f}", f"{summary['audit_timing']['seconds']:.1f}",
                      f"{summary['audit_timing']['ratio_to_teacher_training']:.2f}", summary["verdict"])
    console = Console()
    console.print(table)
    attacks = Table(title="membership inference per audited model (cold run): LOSS vs reference-model attacks")
    for column in ("model", "attack", "AUC", "AUC 95% CI", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
        attacks.add_column(column)
    for role, audit in cold_summary["audit"].items():
        for name, result in audit["attacks"].items():
            attacks.add_row(role, name + (" *" if name == audit["membership"]["attack"] else ""),
                            f"{result['auc']:.4f}", f"[{result['auc_ci'][0]:.3f}, {result['auc_ci'][1]:.3f}]",
                            f"{result['tpr_at_low_fpr']:.4f}", f"{result['tpr_at_0_1_fpr']:.4f}")
    console.print(attacks)
    console.print("* = strongest (gates use it). Teacher training in the cold run: "
                  f"{cold_summary['models']['teacher']['train_seconds']:.1f} s")


if __name__ == "__main__":
    main()
