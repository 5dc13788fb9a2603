"""Full-size data within the budget its config states: the real pipeline (`kdsec run`) on
full-size SYNTHETIC files in the official formats, timed per stage.

    make bench-full                                   # MNIST-format, 70,000 images (~7 min on 2 cores)
    python benchmarks/full_size.py --dataset cifar10  # 60,000 CIFAR-10 python-pickle images
    python benchmarks/full_size.py --max-samples 3000 # a quick try of the same path
    python benchmarks/full_size.py --dataset fashion_mnist --data-root /path/with/FashionMNIST/raw/..
                                                      # the REAL files instead (e.g. Debian's
                                                      # dataset-fashion-mnist, gunzipped)

The files hold scikit-learn's handwritten digits, each drawn at a random position and contrast
with pixel noise (tests/vision_fixtures.py, ``varied_digit_images``; tinted per class for
CIFAR-10, so there the colour alone gives the class away): learnable, so the accuracies are a
sanity check of the run, not a prediction for the real data sets (each config states those as
ranges). What this measures is what the size costs: reading and splitting 70,000 / 60,000
images, every stage's wall time (from the MLflow stage runs, which carry real start and end
times) and peak RSS, the pipeline process's peak RSS, HE agreement and ms/sample. Each run gets
its own temporary folder (data, working directory, MLflow store, PREFECT_HOME), so caches are
cold and nothing is written to this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.vision_fixtures import varied_digit_images, write_cifar10, write_mnist  # noqa: E402

# The budget each config states for the full data set on 2 CPU cores (seconds; see its header).
BUDGETS = {"mnist": 20 * 60, "fashion_mnist": 20 * 60, "cifar10": 60 * 60}
FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# Pipeline order of the MLflow stage runs (nested under the run's parent).
STAGES = ["data", "teacher", "kd_student", "scratch_student", "compress", "encrypt-at-rest", "homomorphic", "audit",
          "explain", "gates", "register"]


def write_files(dataset: str, root: Path) -> tuple[int, float]:
    """Full-size files in the official format of ``dataset``: (images written, seconds)."""
    started = time.perf_counter()
    if dataset == "cifar10":
        write_cifar10(root, per_batch=10_000, test=10_000, draw=varied_digit_images)
        return 60_000, time.perf_counter() - started
    write_mnist(root, FOLDERS[dataset], train=60_000, test=10_000, draw=varied_digit_images)
    return 70_000, time.perf_counter() - started


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of ``pid`` and its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(member, 0) for member in tree)


class TreeMemory:
    """Samples the summed RSS of a process and its descendants (the pipeline and Prefect's
    temporary server) once a second; ``stop()`` returns the (wall-clock time, bytes) samples."""

    def __init__(self, pid: int) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self._thread.start()

    def _sample(self, pid: int) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((time.time(), tree_rss(pid)))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def run_pipeline(dataset: str, data_root: Path, workdir: Path, max_samples: int, log: Path,
                 synthetic: bool = True) -> dict:
    """``kdsec run`` on the files, in ``workdir`` with its own MLflow store and PREFECT_HOME."""
    config = ROOT / "configs" / f"{dataset}.yaml"
    command = [str(Path(sys.executable).parent / "kdsec"), "run", "--config", str(config),
               "--set", f"data.root={data_root}"]
    if synthetic:  # synthetic files have no official checksums; real ones are checked
        command += ["--set", "data.verify_checksums=false"]
    if max_samples:
        command += ["--set", f"data.max_samples={max_samples}"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(workdir / "prefect-home"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "COLUMNS": "200"})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        memory = TreeMemory(process.pid)
        code = process.wait()
        samples = memory.stop()
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text()
    if code not in (0, 2):
        sys.exit(f"kdsec run failed ({code}); last lines of {log}:\n" + "\n".join(text.splitlines()[-30:]))
    summary_line = next(line for line in text.splitlines() if line.startswith("summary:"))
    summary = json.loads((workdir / summary_line.split("summary:", 1)[1].strip()).read_text())
    spans = stage_spans(workdir / "mlflow.db", summary["run_id"])
    return {"exit_code": code, "wall_seconds": wall, "summary": summary,
            # ru_maxrss (KiB on Linux) of the largest waited-for descendant: the pipeline process
            "peak_rss_bytes": usage.ru_maxrss * 1024, "tree_peak_bytes": max((rss for _, rss in samples), default=0),
            "cpu_seconds": (usage.ru_utime + usage.ru_stime) - (before.ru_utime + before.ru_stime),
            "stages": {name: end - start for name, (start, end) in spans.items()},
            "stage_peak_bytes": {name: max((rss for at, rss in samples if start <= at <= end), default=0)
                                 for name, (start, end) in spans.items()}}


def stage_spans(store: Path, parent_run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) in seconds since the epoch of each stage run nested under the parent run,
    and of the parent run itself."""
    with sqlite3.connect(store) as db:
        rows = db.execute("select runs.name, runs.start_time, runs.end_time from runs join tags "
                          "on tags.run_uuid = runs.run_uuid where tags.key = 'mlflow.parentRunId' and tags.value = ?",
                          (parent_run_id,)).fetchall()
        parent = db.execute("select start_time, end_time from runs where run_uuid = ?", (parent_run_id,)).fetchone()
    spans = {name: (start / 1000, end / 1000) for name, start, end in rows if end}
    if parent and parent[1]:
        spans["(parent run)"] = (parent[0] / 1000, parent[1] / 1000)
    return spans


def print_report(dataset: str, images: int, write_seconds: float, result: dict, budget: float,
                 max_samples: int) -> bool:
    summary = result["summary"]
    console = Console(width=150)
    if images:
        size = f"{max_samples:,} of {images:,}" if max_samples else f"{images:,}"
        what = f"{size} synthetic images in the official format"
    else:
        what = "the real official files" + (f" ({max_samples:,} samples)" if max_samples else "")
    table = Table(title=f"configs/{dataset}.yaml on {what} ({os.cpu_count()} CPU cores)")
    for column in ("stage", "seconds", "share of wall", "peak RSS GiB (tree, 1 s samples)"):
        table.add_column(column)
    wall = result["wall_seconds"]
    stages, peaks = result["stages"], result["stage_peak_bytes"]
    for name in [*STAGES, *sorted(set(stages) - set(STAGES) - {"(parent run)"})]:
        if name in stages:
            table.add_row(name, f"{stages[name]:.1f}", f"{stages[name] / wall:.2f}",
                          f"{peaks[name] / 2**30:.2f}" if peaks[name] else "-")
    staged = sum(seconds for name, seconds in stages.items() if name != "(parent run)")
    table.add_row("start-up, imports, orchestration, report (rest)", f"{wall - staged:.1f}",
                  f"{(wall - staged) / wall:.2f}")
    table.add_row("[b]kdsec run, wall[/]", f"{wall:.1f}", "1.00")
    if images:
        table.add_row("writing the synthetic files (not part of the run)", f"{write_seconds:.1f}", "")
    console.print(table)

    models = summary["models"]
    he = summary["he"]
    facts = Table(title=f"accuracy ({'synthetic data: a sanity check' if images else 'real data'}), HE, memory")
    facts.add_column("measure")
    facts.add_column("value")
    for role in ("teacher", "scratch_student", "kd_student"):
        model = models[role]
        facts.add_row(f"{role} test accuracy", f"{model['test_accuracy']:.4f} "
                      f"({model['epochs_run']} epochs, {model['train_seconds']:.0f} s)")
    facts.add_row("candidate", f"{summary['candidate']['variant']} {summary['candidate']['test_accuracy']:.4f}")
    if he["enabled"]:
        for run in he["runs"]:
            facts.add_row(f"HE {run['mode']} ({run['path']})",
                          f"agreement {run['agreement']:.5f} on {run['samples']}, "
                          f"{run['ms_per_sample']:.2f} ms/sample, N={run['poly_modulus_degree']}")
    audit = summary["audit_timing"]
    facts.add_row("audit", f"{audit['seconds']:.0f} s = {audit['ratio_to_teacher_training']:.2f}× teacher training")
    facts.add_row("peak RSS, pipeline process", f"{result['peak_rss_bytes'] / 2**30:.2f} GiB (ru_maxrss)")
    facts.add_row("peak RSS, process tree (1 s samples)", f"{result['tree_peak_bytes'] / 2**30:.2f} GiB")
    cpu = result["cpu_seconds"]
    facts.add_row("CPU time / wall", f"{cpu:.0f} s / {wall:.0f} s = {cpu / wall:.2f}")
    facts.add_row("verdict (exit code)", f"{summary['verdict']} ({result['exit_code']}); failed gates: "
                  f"{', '.join(summary['failed_gates']) or 'none'}")
    console.print(facts)
    met = wall <= budget
    scope = "" if not max_samples else " (a reduced run: the budget is for the full size)"
    console.print(f"budget {budget / 60:.0f} min on 2 cores: {'MET' if met else 'NOT MET'} "
                  f"({wall / 60:.1f} min){scope}")
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(BUDGETS), default="mnist")
    parser.add_argument("--max-samples", type=int, default=0, help="data.max_samples for a quick try (0 = all)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="run on the real official files under this folder instead of synthetic ones")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix=f"kdsec-full-{args.dataset}-"))
    try:
        data_root, workdir = scratch / "data", scratch / "work"
        workdir.mkdir(parents=True)
        if args.data_root:
            data_root, images, write_seconds = args.data_root.resolve(), 0, 0.0
            print(f"real {args.dataset} files under {data_root}; running the pipeline (log: {scratch / 'run.log'})",
                  flush=True)
        else:
            images, write_seconds = write_files(args.dataset, data_root)
            print(f"wrote {images:,} synthetic {args.dataset} images in {write_seconds:.1f} s under {data_root}; "
                  f"running the pipeline (log: {scratch / 'run.log'})", flush=True)
        result = run_pipeline(args.dataset, data_root, workdir, args.max_samples, scratch / "run.log",
                              synthetic=args.data_root is None)
        (scratch / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2))
        met = print_report(args.dataset, images, write_seconds, result, BUDGETS[args.dataset], args.max_samples)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if not met and not args.max_samples:
        sys.exit(1)


if __name__ == "__main__":
    main()
