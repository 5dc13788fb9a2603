"""What a new user waits for, from a fresh clone, broken down: `make run` cold (sync + imports +
orchestration start + each pipeline stage) and warm (second `make run`), `kdsec --help`, and the
audit's cost relative to teacher training with its strength (AUC / TPR per attack).

    make bench            (uv's package cache warm, as after any earlier sync; 2-core CPU)

Every figure of one table comes from the same invocation; ratios are against the cold run.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if check and result.returncode not in (0, 2):
        sys.exit(f"{' '.join(command)} failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    return elapsed, result.stdout


def summary_of(clone: Path, stdout: str) -> dict:
    path = next(line.split("summary:", 1)[1].strip() for line in stdout.splitlines() if line.startswith("summary:"))
    return json.loads((clone / path).read_text())


def stage_seconds(clone: Path, env: dict[str, str], summary: dict) -> dict[str, float]:
    """Seconds per Prefect task name (summed over its runs) of the run's flow run, read from the
    local server that ran it."""
    with sqlite3.connect(clone / "mlflow.db") as db:
        (flow_run,) = db.execute("select value from tags where run_uuid = ? and key = 'kdsec.prefect_flow_run_id'",
                                 (summary["run_id"],)).fetchone()
    script = ("import json, sys, asyncio\n"
              "from prefect.client.orchestration import get_client\n"
              "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
              "async def main():\n"
              "    async with get_client() as client:\n"
              f"        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=['{flow_run}'])))\n"
              "        flow = await client.read_flow_run('" + flow_run + "')\n"
              "        out = {}\n"
              "        for run in runs:\n"
              "            out[run.name.rsplit('-', 1)[0]] = out.get(run.name.rsplit('-', 1)[0], 0) + run.total_run_time.total_seconds()\n"
              "        out['(flow run total)'] = flow.total_run_time.total_seconds()\n"
              "        print(json.dumps(out))\n"
              "asyncio.run(main())\n")
    _, stdout = timed([str(clone / ".venv/bin/python"), "-c", script], clone, env)
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="kdsec-bench-"))
    clone = scratch / "kdsec"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (scratch / "shared").symlink_to(shared)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    env.update({"PREFECT_HOME": str(scratch / "prefect-home"), "COLUMNS": "200", "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_TELEMETRY": "false"})
    python = str(clone / ".venv/bin/python")
    try:
        rows: list[tuple[str, float, str]] = []
        sync, _ = timed(["make", "sync"], clone, env)
        rows.append(("uv sync into the new .venv (bytecode compiled)", sync, "make sync"))
        imports, _ = timed([python, "-c", "import kdsec.cli, flows.kd_pipeline"], clone, env)
        rows.append(("import the stack (first time, compiled bytecode)", imports, "python -c 'import …'"))
        bare_env = {**env, "PYTHONPYCACHEPREFIX": str(scratch / "empty-pycache"), "PYTHONDONTWRITEBYTECODE": "1"}
        no_bytecode, _ = timed([python, "-c", "import kdsec.cli, flows.kd_pipeline"], clone, bare_env)
        rows.append(("  same, without compiled bytecode (before: compiled on first import)", no_bytecode, "for comparison"))
        server, _ = timed([python, "-m", "flows.local_server", "start"], clone, env)
        rows.append(("start the local Prefect server (once)", server, "python -m flows.local_server start"))
        run_env = {**env, "KDSEC_LOCAL_SERVER": "1"}
        pipeline, stdout = timed([str(clone / ".venv/bin/kdsec"), "run"], clone, run_env)
        rows.append(("kdsec run, attached (imports + flow + pipeline)", pipeline, "first run: caches cold"))
        cold_summary = summary_of(clone, stdout)
        stages = stage_seconds(clone, run_env, cold_summary)
        cold = sync + server + pipeline
        warm, stdout = timed(["make", "run"], clone, env)
        warm_summary = summary_of(clone, stdout)
        temporary, stdout = timed([str(clone / ".venv/bin/kdsec"), "run"], clone, env)  # no local server
        helps = [timed([str(clone / ".venv/bin/kdsec"), "--help"], clone, env)[0] for _ in range(3)]
        show = [timed([str(clone / ".venv/bin/kdsec"), "show-config"], clone, env)[0] for _ in range(3)]
        bad = [timed([str(clone / ".venv/bin/kdsec"), "run", "--set", "nope=1"], clone, env, check=False)[0]
               for _ in range(3)]
    finally:
        subprocess.run([str(clone / ".venv/bin/python"), "-m", "flows.local_server", "stop"], cwd=clone, env=env,
                       capture_output=True)

    console = Console(width=140)
    table = Table(title="From a fresh clone: what `make run` costs (2-core CPU, uv cache warm)")
    for column in ("step", "seconds", "share of cold", "note"):
        table.add_column(column)
    for name, seconds, note in rows:
        table.add_row(name, f"{seconds:.1f}", f"{seconds / cold:.2f}", note)
    for name, seconds in sorted(stages.items(), key=lambda item: -item[1]):
        table.add_row(f"  stage {name}", f"{seconds:.1f}", f"{seconds / cold:.2f}", "Prefect task run time")
    table.add_row("[b]cold make run (sync + server + run)[/]", f"{cold:.1f}", "1.00", "target ≤ 120 s")
    table.add_row("[b]warm make run[/]", f"{warm:.1f}", f"{warm / cold:.2f}", "target ≤ 0.5× cold")
    table.add_row("warm kdsec run on a temporary server (before)", f"{temporary:.1f}", f"{temporary / cold:.2f}",
                  "no local server: one started per run")
    table.add_row("kdsec --help (median of 3)", f"{statistics.median(helps):.2f}", "", "target ≤ 2 s")
    table.add_row("kdsec show-config (median of 3)", f"{statistics.median(show):.2f}", "", "")
    table.add_row("kdsec run with a bad --set (median of 3)", f"{statistics.median(bad):.2f}", "", "one-line error")
    console.print(table)

    audit = Table(title="The audit's cost and strength (same seeds)")
    for column in ("run", "teacher cache", "teacher train s", "audit s", "audit / teacher train", "verdict"):
        audit.add_column(column)
    for name, summary in (("cold", cold_summary), ("warm", warm_summary)):
        timing = summary["audit_timing"]
        audit.add_row(name, summary["teacher_cache"], f"{timing['teacher_train_seconds']:.1f}",
                      f"{timing['seconds']:.1f}", f"{timing['ratio_to_teacher_training']:.2f}", summary["verdict"])
    console.print(audit)
    attacks = Table(title="membership inference per audited model (cold run)")
    for column in ("model", "attack", "AUC", "AUC 95% CI", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
        attacks.add_column(column)
    for role, model_audit in cold_summary["audit"].items():
        for name, result in model_audit["attacks"].items():
            attacks.add_row(role, name + (" *" if name == model_audit["membership"]["attack"] else ""),
                            f"{result['auc']:.4f}", f"[{result['auc_ci'][0]:.3f}, {result['auc_ci'][1]:.3f}]",
                            f"{result['tpr_at_low_fpr']:.4f}", f"{result['tpr_at_0_1_fpr']:.4f}")
    console.print(attacks)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
