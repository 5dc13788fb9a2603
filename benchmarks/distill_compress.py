"""Distillation and compression on digits, every number a ratio measured in the same run:

1. distillation gain: KD student − scratch student test accuracy, mean over 3 seeds;
2. training-loop overhead: kdsec.train.fit samples/s vs a bare PyTorch loop (same model, data,
   batch size, optimizer; fit's per-epoch validation included);
3. structured pruning at 50% (fine-tuned on the KD objective): latency and accuracy vs dense, for
   the HE student (default and a wide one) and a CNN student, single sample and a batch of 256;
4. dynamic int8: serialized size and accuracy vs fp32 for a Linear-heavy student;
5. static int8 (torchao PT2E, calibrated) for a conv student: size, accuracy, latency of the
   reference program and of the program lowered to oneDNN int8 kernels;
6. feature-based distillation (FitNets for the MLP, attention transfer for the CNN) vs Hinton KD.

    uv run python benchmarks/distill_compress.py   (or: make bench-compress)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from kdsec import trainers
from kdsec.compress import candidates
from kdsec.compress import load_int8, quantize_dynamic_int8, save_int8, structured_prune
from kdsec.compress.measure import cpu_latency_ms
from kdsec.compress.static_quant import load_static_int8, quantize_static_int8, save_static_int8
from kdsec.config import load_config
from kdsec.data import prepare_data
from kdsec.models import ModelSpec, build_model, count_flops, load_checkpoint, save_checkpoint
from kdsec.train import accuracy, fit, seed_everything


def batch_latency_ms(model, inputs: np.ndarray, repeats: int = 30) -> float:
    return cpu_latency_ms(model, inputs, repeats, batch=256)


def bare_loop_samples_per_s(model, x, y, batch_size: int, epochs: int, lr: float, fused: bool = False) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    inputs, targets = torch.as_tensor(x), torch.as_tensor(y)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(targets), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epochs * len(targets) / (time.perf_counter() - start)


def main() -> None:
    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="kdsec-compress-"))
    base = load_config(None, [])
    bundle = prepare_data(base.data)

    # 1. distillation gain over 3 seeds
    gains = []
    with console.status("distillation gain: teacher, scratch and KD student × 3 seeds"):
        for seed in (0, 1, 2):
            config = load_config(None, [f"seed={seed}"])
            teacher = trainers.train_teacher(config, bundle, folder / f"teacher{seed}.safetensors")
            scratch = trainers.train_scratch_student(config, bundle, folder / f"scratch{seed}.safetensors")
            student = trainers.distill_student(config, bundle, teacher, folder / f"kd{seed}.safetensors")
            gains.append((teacher.test_accuracy, scratch.test_accuracy, student.test_accuracy))
    table = Table(title=f"1. Distillation gain on digits ({base.student.arch} {base.student.hidden}, "
                        f"{base.distill.loss}, T={base.distill.temperature:g}, α={base.distill.alpha:g})")
    for column in ("seed", "teacher", "scratch", "KD", "gain (pt)"):
        table.add_column(column, justify="right")
    for seed, (t, s, k) in enumerate(gains):
        table.add_row(str(seed), f"{t:.4f}", f"{s:.4f}", f"{k:.4f}", f"{(k - s) * 100:+.2f}")
    mean_gain = float(np.mean([k - s for _, s, k in gains])) * 100
    table.add_row("mean", "", "", "", f"[bold]{mean_gain:+.2f}[/bold] (target ≥ +0.5)")
    console.print(table)

    # 2. training-loop overhead
    train = base.student.train.model_copy(update={"epochs": 60, "patience": 60})
    spec = trainers.student_spec(base, bundle)
    rates = {"bare": [], "bare_fused": [], "fit": []}
    for _ in range(5):  # interleaved, so machine noise hits all alike
        for name, fused in (("bare", False), ("bare_fused", True)):
            seed_everything(0)
            rates[name].append(bare_loop_samples_per_s(build_model(spec), bundle.x_train, bundle.y_train,
                                                       train.batch_size, train.epochs, train.lr, fused))
        seed_everything(0)
        start = time.perf_counter()
        result = fit(build_model(spec), bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, train)
        rates["fit"].append(result.epochs_run * len(bundle.y_train) / (time.perf_counter() - start))
    bare, fused, ours = (statistics.median(rates[name]) for name in ("bare", "bare_fused", "fit"))
    table = Table(title=f"2. Training loop throughput (same model, data, batch size {train.batch_size}, Adam; "
                        f"{train.epochs} epochs, median of 5)")
    for column in ("loop", "samples/s", "ratio to bare"):
        table.add_column(column, justify="right")
    table.add_row("bare PyTorch loop (default Adam)", f"{bare:,.0f}", "1.00")
    table.add_row("bare PyTorch loop, fused Adam (fit's optimizer, no extras)", f"{fused:,.0f}", f"{fused / bare:.2f}")
    table.add_row("kdsec.train.fit (fused Adam + clipping, validation, best-epoch copy, progress)", f"{ours:,.0f}",
                  f"[bold]{ours / bare:.2f}[/bold] (target ≥ 0.9)")
    console.print(table)

    # 3. structured pruning at 50%
    structured_epochs = base.compress.structured_finetune_epochs
    table = Table(title=f"3. Structured pruning at 50% vs dense (fine-tuned {structured_epochs} epochs on the KD objective)")
    for column in ("student", "variant", "params", "FLOPs", "test acc", "Δ acc (pt)", "1-sample ms",
                   "× dense", "256-batch ms", "× dense"):
        table.add_column(column, justify="right")
    teacher = trainers.train_teacher(base, bundle, folder / "teacher0.safetensors")
    for arch_overrides in ([], ["student.hidden=[256,128]"],
                           ["student.arch=student_cnn", "student.channels=[32,64]", "student.fc=128"]):
        config = load_config(None, arch_overrides)
        student = trainers.distill_student(config, bundle, teacher, folder / f"kd-{'-'.join(arch_overrides)}.safetensors")
        # The pipeline's own compression stage, structured variant only (prune, rebuild, fine-tune).
        only_structured = config.compress.model_copy(update={"sparsity": 0.0, "structured": 0.5, "quantize": False,
                                                             "static_int8": False})
        variants = candidates.compress_student(only_structured, bundle, student, config.student.train, config.seed,
                                           folder, trainers.distiller_for(config, bundle, teacher).objective)
        rows = {}
        for variant in variants:  # dense, structured50; timed again, longer than the stage does
            model = candidates.load_variant(variant)
            one = statistics.median(cpu_latency_ms(model, bundle.x_test, 200) for _ in range(3))
            rows[variant.name] = (model, variant.test_accuracy, one, batch_latency_ms(model, bundle.x_test))
        for name, (model, acc, one, batch) in rows.items():
            _, dense_acc, dense_one, dense_batch = rows["dense"]
            label = config.student.arch + (f" {config.student.hidden}" if config.student.arch == "he_mlp" else "")
            table.add_row(label, name, f"{sum(p.numel() for p in model.parameters()):,}",
                          f"{count_flops(model, bundle.input_shape):,}", f"{acc:.4f}",
                          f"{(acc - dense_acc) * 100:+.2f}", f"{one:.4f}", f"{one / dense_one:.2f}",
                          f"{batch:.3f}", f"{batch / dense_batch:.2f}")
    # The seed use case's input shape: latency is compute, not call overhead (weights untrained:
    # accuracy does not apply, and latency does not depend on the values).
    spec32 = ModelSpec("student_cnn", (3, 32, 32), 10, {"channels": [32, 64], "fc": 128})
    dense32 = build_model(spec32).eval()
    smaller32, _ = structured_prune(dense32, spec32, 0.5)
    images = np.random.default_rng(0).uniform(0, 1, (256, 3, 32, 32)).astype(np.float32)
    rows32 = {name: (model, statistics.median(cpu_latency_ms(model, images, 200) for _ in range(3)),
                     batch_latency_ms(model, images)) for name, model in (("dense", dense32), ("structured50", smaller32))}
    for name, (model, one, batch) in rows32.items():
        _, dense_one, dense_batch = rows32["dense"]
        table.add_row("student_cnn 3×32×32", name, f"{sum(p.numel() for p in model.parameters()):,}",
                      f"{count_flops(model, (3, 32, 32)):,}", "n/a", "", f"{one:.4f}", f"{one / dense_one:.2f}",
                      f"{batch:.3f}", f"{batch / dense_batch:.2f}")
    console.print(table)
    console.print("targets: latency ≤ 0.65× dense, accuracy drop ≤ 1 pt")

    # 4. dynamic int8 on a Linear-heavy student
    config = load_config(None, ["student.hidden=[256,128]"])
    student = trainers.distill_student(config, bundle, teacher, folder / "kd-wide.safetensors")
    dense, spec = load_checkpoint(Path(student.checkpoint))
    fp32_path = save_checkpoint(dense, spec, folder / "wide-fp32.safetensors")
    int8_path = save_int8(quantize_dynamic_int8(dense), spec, folder / "wide-int8.safetensors")
    int8, _ = load_int8(int8_path)
    fp32_acc, int8_acc = accuracy(dense, bundle.x_test, bundle.y_test), accuracy(int8, bundle.x_test, bundle.y_test)
    table = Table(title="4. Dynamic int8 (Linear layers), he_mlp 64→256→128→10, stored as safetensors")
    for column in ("variant", "bytes", "× fp32", "test acc", "Δ acc (pt)"):
        table.add_column(column, justify="right")
    table.add_row("fp32", f"{fp32_path.stat().st_size:,}", "1.00", f"{fp32_acc:.4f}", "")
    table.add_row("int8", f"{int8_path.stat().st_size:,}",
                  f"[bold]{int8_path.stat().st_size / fp32_path.stat().st_size:.3f}[/bold] (target ≤ 0.3)",
                  f"{int8_acc:.4f}", f"{(int8_acc - fp32_acc) * 100:+.2f} (target ≥ −0.5)")
    console.print(table)

    # 5. static int8 (torchao PT2E, calibrated on 256 training inputs) for a conv student
    config = load_config(None, ["student.arch=student_cnn", "student.channels=[32,64]", "student.fc=128"])
    cnn = trainers.distill_student(config, bundle, teacher, folder / "kd-student_cnn.safetensors")
    dense, spec = load_checkpoint(Path(cnn.checkpoint))
    static_path = save_static_int8(quantize_static_int8(dense, bundle.x_train[:256]), spec,
                                   folder / "cnn-static-int8.safetensors")
    reference, _ = load_static_int8(static_path, lower=False)
    lowered, _ = load_static_int8(static_path)  # what serving and the variant table use
    fp32_path = Path(cnn.checkpoint)
    fp32_acc = accuracy(dense, bundle.x_test, bundle.y_test)
    table = Table(title="5. Static int8 (PT2E, X86 quantizer, per-channel weights, calibrated activations), student_cnn")
    for column in ("variant", "bytes", "× fp32", "test acc", "Δ acc (pt)", "1-sample ms", "× fp32",
                   "256-batch ms", "× fp32"):
        table.add_column(column, justify="right")
    programs = {"fp32": dense, "int8 reference program": reference, "int8 lowered (oneDNN)": lowered}
    timings = {name: (statistics.median(cpu_latency_ms(model, bundle.x_test, 200) for _ in range(3)),
                      statistics.median(batch_latency_ms(model, bundle.x_test) for _ in range(3)))
               for name, model in programs.items()}
    for name, model in programs.items():
        path = fp32_path if name == "fp32" else static_path
        acc = accuracy(model, bundle.x_test, bundle.y_test)
        one, batch = timings[name]
        table.add_row(name, f"{path.stat().st_size:,}", f"{path.stat().st_size / fp32_path.stat().st_size:.3f}",
                      f"{acc:.4f}", f"{(acc - fp32_acc) * 100:+.2f}", f"{one:.4f}", f"{one / timings['fp32'][0]:.2f}",
                      f"{batch:.3f}", f"[bold]{batch / timings['fp32'][1]:.2f}[/bold]")
    # At CIFAR's input size, where the convolutions are the work (untrained weights: latency only).
    spec32 = ModelSpec("student_cnn", (3, 32, 32), 10, {"channels": [32, 64], "fc": 128})
    dense32 = build_model(spec32).eval()
    images = np.random.default_rng(0).uniform(0, 1, (256, 3, 32, 32)).astype(np.float32)
    lowered32, _ = load_static_int8(save_static_int8(quantize_static_int8(dense32, images), spec32,
                                                     folder / "cnn32-static-int8.safetensors"))
    fp32_32 = statistics.median(batch_latency_ms(dense32, images) for _ in range(3))
    int8_32 = statistics.median(batch_latency_ms(lowered32, images) for _ in range(3))
    table.add_row("3×32×32: fp32", "", "", "n/a", "", "", "", f"{fp32_32:.3f}", "1.00")
    table.add_row("3×32×32: int8 lowered", "", "", "n/a", "", "", "", f"{int8_32:.3f}",
                  f"[bold]{int8_32 / fp32_32:.2f}[/bold]")
    console.print(table)
    console.print("the reference program runs quantize → dequantize → float op (int8 numbers, fp32-plus cost); "
                  "loading lowers it to oneDNN int8 kernels")

    # 6. distillation losses, same teacher and seed: logits only vs feature-based
    table = Table(title="6. Distillation losses on digits (seed 0, same teacher)")
    for column in ("student", "loss", "test acc", "Δ vs hinton_kd (pt)"):
        table.add_column(column, justify="right")
    for arch, feature_loss in ((["student.arch=he_mlp"], "fitnets"),
                               (["student.arch=student_cnn", "student.channels=[16,32]", "student.fc=64"], "attention")):
        accs = {}
        for loss in ("hinton_kd", feature_loss):
            config = load_config(None, [*arch, f"distill.loss={loss}"])
            trained = trainers.distill_student(config, bundle, teacher, folder / f"loss-{loss}.safetensors")
            accs[loss] = trained.test_accuracy
        for loss, acc in accs.items():
            table.add_row(config.student.arch, loss, f"{acc:.4f}", f"{(acc - accs['hinton_kd']) * 100:+.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
