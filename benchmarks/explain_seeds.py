"""Does distillation make the student decide for the teacher's reasons? The explanation trust
check (``kdsec.explain``) on digits over several seeds, and what it costs.

Per seed (``seed`` and ``data.seed`` both set to it), as the default pipeline does: the teacher,
the scratch student, the KD student, the compressed variants and the selected candidate, all
explained on the same sample (``explain`` defaults). Then the models the explanation gate exists
to stop, each explained as a run's candidate would be: a randomly initialised student and one
trained on shuffled labels.

Tables: (1) per seed, agreement with the teacher (Spearman, top-k overlap) of every model under
every method; (2) scratch vs KD over seeds, mean ± standard deviation, and whether KD raises
agreement; (3) where the gate's default sits between the default candidates and the models it
must fail; (4) the check's cost against the wall time of a default ``kd-pipeline`` run (the real
flow, in a temporary folder, in this process).

    uv run --frozen python benchmarks/explain_seeds.py [--seeds 5] [--no-cost]   (~1.5 min on 2 idle cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kdsec import roles, trainers
from kdsec.compress import candidates
from kdsec.config import GatesConfig, PipelineConfig, load_config
from kdsec.data import DataBundle, prepare_data
from kdsec.explain import ExplainResult, explain_models
from kdsec.gates import Gate, Metric, evaluate_gates
from kdsec.models import build_model
from kdsec.train import fit, seed_everything

RANDOM_INIT, SHUFFLED = "random_init", "shuffled_labels"
SCORES = ("spearman", "top_k_overlap")


def pipeline_models(config: PipelineConfig, bundle: DataBundle, folder: Path) -> tuple[dict, str]:
    """Every model a default run explains (role → model) and the candidate's role."""
    teacher = trainers.train_teacher(config, bundle, folder / "teacher.safetensors")
    scratch = trainers.train_scratch_student(config, bundle, folder / "scratch_student.safetensors")
    student = trainers.distill_student(config, bundle, teacher, folder / "kd_student.safetensors")
    variants = candidates.compress_student(config.compress, bundle, student, config.student.train, config.seed,
                                           folder, trainers.distiller_for(config, bundle, teacher).objective,
                                           config.distill.transfer_set)
    candidate = candidates.select_candidate(variants, teacher.val_accuracy, config.gates, config.compress.selection)
    models = {model.role: model.load() for model in (teacher, scratch, student)}
    models.update({roles.variant_role(v.name): candidates.load_variant(v) for v in variants if v.name != roles.DENSE})
    return models, roles.variant_role(candidate.name)


def unrelated_students(config: PipelineConfig, bundle: DataBundle) -> dict:
    """Students whose explanations owe nothing to the teacher: untrained, and trained (to memorise)
    on the training images with their labels shuffled."""
    spec = trainers.student_spec(config, bundle)
    seed_everything(config.seed)
    random_init = build_model(spec).eval()
    seed_everything(config.seed)
    shuffled = build_model(spec)
    labels = np.random.default_rng(config.seed).permutation(bundle.y_train)
    train = config.student.train.model_copy(update={"epochs": 100, "patience": 100})
    fit(shuffled, bundle.x_train, labels, bundle.x_train, labels, train, seed=config.seed, label=SHUFFLED)
    return {RANDOM_INIT: random_init, SHUFFLED: shuffled.eval()}


def seed_results(seed: int, folder: Path) -> tuple[ExplainResult, dict[str, ExplainResult]]:
    config = load_config(None, [f"seed={seed}", f"data.seed={seed}"])
    bundle = prepare_data(config.data)
    models, candidate_role = pipeline_models(config, bundle, folder)
    run = explain_models(models, bundle, config.explain, candidate_role)
    unrelated = {name: explain_models({roles.TEACHER: models[roles.TEACHER], name: model}, bundle, config.explain,
                                      name)
                 for name, model in unrelated_students(config, bundle).items()}
    return run, unrelated


def score(result: ExplainResult, role: str, method: str, name: str) -> float:
    return getattr(result.models[role].methods[method], name)


def spread(values: list[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.3f} ± {deviation:.3f}"


def per_seed_table(results: dict[int, tuple[ExplainResult, dict[str, ExplainResult]]], methods: list[str]) -> Table:
    table = Table(title="Agreement with the teacher's attributions (mean over the sample; [95% bootstrap interval])")
    for column in ("seed", "method", "score", "scratch", "KD", "candidate", "random init", "shuffled labels"):
        table.add_column(column, justify="left" if column in ("method", "score") else "right")
    for seed, (run, unrelated) in results.items():
        for method in methods:
            for name in SCORES:
                cells = []
                for result, role in ((run, roles.SCRATCH_STUDENT), (run, roles.KD_STUDENT), (run, roles.CANDIDATE),
                                     (unrelated[RANDOM_INIT], RANDOM_INIT), (unrelated[SHUFFLED], SHUFFLED)):
                    low, high = getattr(result.models[role].methods[method], f"{name}_ci")
                    cells.append(f"{score(result, role, method, name):.3f} [{low:.3f}, {high:.3f}]")
                table.add_row(str(seed), method, name, *cells)
    return table


def kd_table(results: dict, methods: list[str]) -> tuple[Table, list[str]]:
    table = Table(title=f"Scratch vs KD student over {len(results)} seeds: mean ± standard deviation")
    for column in ("method", "score", "scratch", "KD", "KD − scratch", "seeds KD higher"):
        table.add_column(column, justify="left" if column in ("method", "score") else "right")
    answers = []
    for method in methods:
        for name in SCORES:
            scratch = [score(run, roles.SCRATCH_STUDENT, method, name) for run, _ in results.values()]
            kd = [score(run, roles.KD_STUDENT, method, name) for run, _ in results.values()]
            gains = [k - s for k, s in zip(kd, scratch)]
            higher = sum(gain > 0 for gain in gains)
            table.add_row(method, name, spread(scratch), spread(kd), spread(gains), f"{higher}/{len(gains)}")
            mean, sd = statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
            verdict = ("raises" if higher == len(gains) and mean > sd else
                       "lowers" if higher == 0 and -mean > sd else "does not clearly change")
            answers.append(f"{method} {name}: KD {verdict} agreement with the teacher "
                           f"(KD − scratch {mean:+.3f} ± {sd:.3f}, higher in {higher} of {len(gains)} seeds)")
    return table, answers


def gate_table(results: dict, config: PipelineConfig) -> tuple[Table, list[str]]:
    """The explanation gate's metric (primary method) for default candidates and unrelated students."""
    gates, method = GatesConfig(), config.explain.primary
    table = Table(title=f"Explanation gate ({method} Spearman ≥ {gates.min_explanation_spearman}, "
                        f"warn below {gates.warn_explanation_spearman})")
    for column in ("seed", "model", "Spearman", "95% interval", "gate"):
        table.add_column(column, justify="left" if column == "model" else "right")
    values: dict[str, list[float]] = {}
    for seed, (run, unrelated) in results.items():
        rows = [(f"default candidate ({run.candidate_role})", run, roles.CANDIDATE),
                (RANDOM_INIT, unrelated[RANDOM_INIT], RANDOM_INIT), (SHUFFLED, unrelated[SHUFFLED], SHUFFLED)]
        for label, result, role in rows:
            value = score(result, role, method, "spearman")
            values.setdefault(label.split(" (")[0], []).append(value)
            level = next(v.level for v in evaluate_gates({Metric.EXPLANATION_SPEARMAN: value}, gates)
                         if v.name == Gate.EXPLANATION)
            low, high = result.models[role].methods[method].spearman_ci
            table.add_row(str(seed), label, f"{value:.3f}", f"[{low:.3f}, {high:.3f}]", level)
    lines = [f"{name}: min {min(v):.3f}, max {max(v):.3f}, mean {statistics.mean(v):.3f}" for name, v in values.items()]
    return table, lines


def _timed(task, spent: list[float], stage: str | None = None):
    """``task`` as the flow calls it, adding each call's wall time (only ``stage``'s, if given) to ``spent``."""
    def call(*args, **kwargs):
        started = time.perf_counter()
        try:
            return task(*args, **kwargs)
        finally:
            if stage is None or args[1] == stage:
                spent.append(time.perf_counter() - started)

    return call


def default_run_cost() -> tuple[float, float, float]:
    """(wall seconds of a default kd-pipeline run, seconds of its explain stage as the flow runs it —
    the Prefect task plus recording its MLflow stage run —, seconds of computing it alone), in a
    temporary folder (own MLflow store, Prefect home, keys and caches: a cold run)."""
    folder = Path(tempfile.mkdtemp(prefix="kdsec-explain-bench-"))
    os.environ.update({"PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
    os.environ.pop("PREFECT_API_URL", None)
    os.chdir(folder)
    from prefect.testing.utilities import prefect_test_harness

    from flows import kd_pipeline as flow_module

    spent: list[float] = []
    flow_module.explain_task = _timed(flow_module.explain_task, spent)
    flow_module.track_stage_task = _timed(flow_module.track_stage_task, spent, "explain")
    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        summary = flow_module.kd_pipeline(config=load_config(None, []).model_dump(mode="json"))
        wall = time.perf_counter() - started
    return wall, sum(spent), summary.explanations.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (at least 3 for the spread)")
    parser.add_argument("--no-cost", action="store_true", help="skip timing a default pipeline run")
    args = parser.parse_args()
    console = Console(width=180)
    config = load_config(None, [])
    methods = list(config.explain.methods)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kdsec-explain-seeds-") as folder:
        for seed in range(args.seeds):
            started = time.perf_counter()
            results[seed] = seed_results(seed, Path(folder) / str(seed))
            console.print(f"seed {seed}: {time.perf_counter() - started:.1f} s "
                          f"(explain stage {results[seed][0].seconds:.2f} s)")
    console.print(per_seed_table(results, methods))
    table, answers = kd_table(results, methods)
    console.print(table)
    for answer in answers:
        console.print(f"  {answer}")
    table, lines = gate_table(results, config)
    console.print(table)
    for line in lines:
        console.print(f"  {line}")
    if not args.no_cost:
        wall, stage, computing = default_run_cost()
        console.print(f"cost: the explain stage took {stage:.2f} s of a cold default kd-pipeline run of {wall:.1f} s "
                      f"wall = {stage / wall:.1%} (budget 10%); computing it {computing:.2f} s, the rest is its "
                      f"Prefect task and MLflow stage run (explain.sample_size {config.explain.sample_size}, "
                      f"ig_steps {config.explain.ig_steps}, methods {', '.join(methods)})")


if __name__ == "__main__":
    main()
