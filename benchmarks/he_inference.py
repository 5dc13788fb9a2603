"""Homomorphic inference on the default digits student, every mode side by side in one run.

    uv run python benchmarks/he_inference.py [--seed 0] [--baseline-samples 5]

Trains the default teacher and KD student (≈20 s), an 80%-pruned copy, then measures:
the per-sample vector–matrix approach of TenSEAL's tutorials (their parameters: N=8192,
moduli [31, 26×6, 31], scale 2^26) as the baseline; kdsec's batched encrypted-input path on a
full ciphertext of samples; the single-sample path; encrypted-model mode; dense vs pruned.
Timings are ratios against the baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts
from rich.console import Console
from rich.table import Table

from kdsec.compress import global_magnitude_prune
from kdsec.config import HEConfig, PipelineConfig
from kdsec.he import he_ops, plaintext_forward, run_encrypted_input, run_encrypted_model
from kdsec.data import prepare_data
from kdsec.distill import OfflineDistiller
from kdsec.models import load_checkpoint
from kdsec.trainers import distill_student, train_teacher
from kdsec.train import fit, seed_everything


def tutorial_baseline(ops, inputs: np.ndarray) -> tuple[float, float]:
    """TenSEAL tutorial style: one ciphertext per sample, ``enc_x.mm(W)`` per layer. Returns
    (ms per sample end to end, argmax agreement with plaintext)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31])
    context.global_scale = 2**26
    context.generate_galois_keys()
    weights = [(op.weight.T.tolist(), op.bias.tolist()) if hasattr(op, "weight") else None for op in ops]
    started = time.perf_counter()
    outputs = []
    for sample in inputs.reshape(len(inputs), -1):
        value = ts.ckks_vector(context, sample.tolist())
        for layer in weights:
            value = value.square() if layer is None else value.mm(layer[0]) + layer[1]
        outputs.append(value.decrypt())
    elapsed = time.perf_counter() - started
    agreement = float((np.array(outputs).argmax(1) == plaintext_forward(ops, inputs).argmax(1)).mean())
    return 1e3 * elapsed / len(inputs), agreement


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-samples", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=32)
    args = parser.parse_args()
    console = Console()
    config = PipelineConfig().model_copy(update={"seed": args.seed})
    bundle = prepare_data(config.data)
    with console.status("training the default teacher and KD student"):
        scratch = Path(tempfile.mkdtemp(prefix="kdsec-he-bench-"))
        teacher = train_teacher(config, bundle, scratch / "teacher.safetensors")
        student = distill_student(config, bundle, teacher, scratch / "student.safetensors")
        pruned, _ = load_checkpoint(Path(student.checkpoint))
        distiller = OfflineDistiller(teacher.load(), bundle.x_train, config.distill)
        tune = config.student.train.model_copy(update={"epochs": 30, "patience": 30, "lr": config.student.train.lr / 3})

        def finetune(model) -> None:
            seed_everything(args.seed)
            fit(model, bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, tune, distiller.objective,
                seed=args.seed, label="prune-finetune")

        global_magnitude_prune(pruned, 0.8, finetune)
    dense_ops, pruned_ops = he_ops(student.load()), he_ops(pruned)
    he = HEConfig()
    test = bundle.x_test
    full = np.resize(test, (4096, *test.shape[1:]))  # one full ciphertext of slots

    with console.status("baseline: TenSEAL tutorial, per-sample vector–matrix"):
        baseline_ms, baseline_agreement = tutorial_baseline(dense_ops, test[: args.baseline_samples])
    rows = []
    with console.status("kdsec encrypted input, batched"):
        _, batched_test = run_encrypted_input(dense_ops, test, he, "batched")
        _, batched_full = run_encrypted_input(dense_ops, full, he, "batched")
    with console.status("kdsec encrypted input, single sample"):
        latencies = []
        for index in range(args.latency_samples):
            latencies.append(run_encrypted_input(dense_ops, test[index : index + 1], he, "single")[1])
        _, single_test = run_encrypted_input(dense_ops, test, he, "single")
    with console.status("kdsec encrypted model"):
        _, model_test = run_encrypted_model(dense_ops, test, he)
    with console.status("dense vs 80%-pruned, batched"):
        _, pruned_full = run_encrypted_input(pruned_ops, full, he, "batched")

    single_ms = statistics.median(run.ms_per_sample for run in latencies)
    rows = [
        ("TenSEAL tutorial (baseline)", "per-sample mm", args.baseline_samples, baseline_agreement, baseline_ms,
         float("nan"), 1.0),
        ("encrypted input", f"batched, {len(full)} samples", len(full), batched_full.agreement,
         batched_full.ms_per_sample, batched_full.server_ms_per_sample, baseline_ms / batched_full.ms_per_sample),
        ("encrypted input", "batched, test split", batched_test.samples, batched_test.agreement,
         batched_test.ms_per_sample, batched_test.server_ms_per_sample, baseline_ms / batched_test.ms_per_sample),
        ("encrypted input", "single, median latency", args.latency_samples, float("nan"), single_ms, float("nan"),
         baseline_ms / single_ms),
        ("encrypted input", "single, test split", single_test.samples, single_test.agreement,
         single_test.ms_per_sample, single_test.server_ms_per_sample, baseline_ms / single_test.ms_per_sample),
        ("encrypted model", "batched, test split", model_test.samples, model_test.agreement,
         model_test.ms_per_sample, model_test.server_ms_per_sample, baseline_ms / model_test.ms_per_sample),
        ("encrypted input, 80% pruned", f"batched, {len(full)} samples", len(full), pruned_full.agreement,
         pruned_full.ms_per_sample, pruned_full.server_ms_per_sample, baseline_ms / pruned_full.ms_per_sample),
    ]
    table = Table(title=f"HE inference, digits student {dense_ops[0].weight.shape[1]}→{dense_ops[0].weight.shape[0]}"
                        f"→x²→{dense_ops[-1].weight.shape[0]} (2-core CPU)")
    for column in ("mode", "path", "samples", "argmax agreement", "ms/sample", "host ms/sample", "× baseline"):
        table.add_column(column, justify="left" if column in ("mode", "path") else "right")
    for mode, path, samples, agreement, ms, host_ms, speedup in rows:
        table.add_row(mode, path, str(samples), "—" if agreement != agreement else f"{agreement:.4f}", f"{ms:.3f}",
                      "—" if host_ms != host_ms else f"{host_ms:.3f}", f"{speedup:,.0f}")
    console.print(table)
    sparsity = np.mean([(op.weight == 0).mean() for op in pruned_ops if hasattr(op, "weight")])
    console.print(f"student accuracy: dense {student.test_accuracy:.4f}, pruned "
                  f"{float((plaintext_forward(pruned_ops, test).argmax(1) == bundle.y_test).mean()):.4f} "
                  f"({sparsity:.0%} of Linear weights zero)")
    console.print(f"80% pruned vs dense, batched 4096: host {batched_full.server_ms_per_sample / pruned_full.server_ms_per_sample:.2f}× "
                  f"faster, end to end {batched_full.ms_per_sample / pruned_full.ms_per_sample:.2f}× faster")
    console.print(f"params: batched {batched_full.coeff_mod_bit_sizes}, single {single_test.coeff_mod_bit_sizes}, "
                  f"model {model_test.coeff_mod_bit_sizes}; context bytes: batched {batched_full.public_context_bytes:,}, "
                  f"single {single_test.public_context_bytes:,}; encrypted-model package {model_test.package_bytes:,}")


if __name__ == "__main__":
    main()
