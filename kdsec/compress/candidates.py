"""Compression driven end to end: the KD student's variants (pruned, structurally pruned, int8),
each fine-tuned and measured, and the rule that selects the candidate to ship."""

from __future__ import annotations

from pathlib import Path

from kdsec import roles
from kdsec.compress.measure import VariantMetrics, measure_variant
from kdsec.compress.prune import global_magnitude_prune
from kdsec.compress.quantize import load_int8, load_weights, quantize_dynamic_int8, save_int8, weights_format
from kdsec.compress.static_quant import load_static_int8, quantize_static_int8, save_static_int8
from kdsec.compress.structured import structured_prune
from kdsec.config import CompressConfig, GatesConfig, TrainConfig
from kdsec.data import DataBundle
from kdsec.models import ModelSpec, has_conv, load_checkpoint, save_checkpoint
from kdsec.train import Objective, cross_entropy_objective, fit, seed_everything


def prune_finetune(model, epochs: int, bundle: DataBundle, finetune: TrainConfig, seed: int,
                   objective: Objective = cross_entropy_objective, split: str = "train") -> None:
    """Fine-tune a pruned ``model`` in place for ``epochs`` (none: nothing) at a third of the
    training learning rate, with ``objective`` on ``split``, stopping patience = epochs."""
    if epochs:
        seed_everything(seed)
        tune = finetune.model_copy(update={"lr": finetune.lr / 3, "epochs": epochs, "patience": epochs})
        fit(model, *bundle.split(split), bundle.x_val, bundle.y_val, tune, objective, seed=seed,
            label="prune-finetune")


def magnitude_rounds_epochs(config: CompressConfig) -> int:
    """Iterative pruning shares the fine-tuning epochs out over its rounds."""
    return -(-config.finetune_epochs // config.prune_steps)


def compress_student(config: CompressConfig, bundle: DataBundle, student, finetune: TrainConfig,
                     seed: int, out_dir: Path, objective: Objective = cross_entropy_objective,
                     split: str = "train", homomorphic: bool = False) -> list[VariantMetrics]:
    """Dense; globally magnitude-pruned (zeros); structurally pruned (smaller layers); and int8
    copies of the pruned ones — each fine-tuned with ``objective`` on ``split`` (e.g. the
    distiller's, so pruned students keep learning from the teacher) and measured. With
    ``homomorphic`` (the candidate must run under CKKS) every variant keeps a homomorphic form."""
    dense, spec = load_checkpoint(Path(student.checkpoint))
    variants = [measure_variant(roles.DENSE, dense, Path(student.checkpoint), bundle, config.latency_repeats)]

    def finetune_model(model, epochs: int) -> None:
        prune_finetune(model, epochs, bundle, finetune, seed, objective, split)

    calibration = bundle.split(split)[0][:config.calibration_samples]

    def add_static(name: str, model, model_spec: ModelSpec) -> None:
        """Static int8 (calibrated activations) for conv students; measured as reloaded from its file.
        Not for a candidate that must run under CKKS (an he_cnn student): the PT2E graph has no
        homomorphic form, and the smallest-passing rule would pick it."""
        if not (config.static_int8 and has_conv(model)) or homomorphic:
            return
        path = save_static_int8(quantize_static_int8(model, calibration), model_spec,
                                out_dir / f"{name + '_' if name else ''}static_int8.safetensors")
        reloaded, _ = load_static_int8(path)
        variants.append(measure_variant(path.stem, reloaded, path, bundle, config.latency_repeats))

    def add(name: str, model, model_spec: ModelSpec, quantize: bool) -> None:
        path = save_checkpoint(model, model_spec, out_dir / f"{name}.safetensors")
        variants.append(measure_variant(name, model, path, bundle, config.latency_repeats))
        add_static(name, model, model_spec)
        if quantize:
            int8_path = save_int8(quantize_dynamic_int8(model), model_spec, out_dir / f"{name}_int8.safetensors")
            reloaded, _ = load_int8(int8_path)  # measure what ships: the model rebuilt from the file
            variants.append(measure_variant(f"{name}_int8", reloaded, int8_path, bundle, config.latency_repeats))

    if config.sparsity > 0:
        pruned, _ = load_checkpoint(Path(student.checkpoint))
        per_round = magnitude_rounds_epochs(config)
        global_magnitude_prune(pruned, config.sparsity, lambda model: finetune_model(model, per_round),
                               config.prune_steps)
        add(f"pruned{round(config.sparsity * 100)}", pruned, spec, config.quantize)
    if config.structured > 0:
        smaller, smaller_spec = structured_prune(dense, spec, config.structured)
        finetune_model(smaller, config.structured_finetune_epochs)
        add(f"structured{round(config.structured * 100)}", smaller, smaller_spec, config.quantize)
    if config.quantize and len(variants) == 1:
        path = save_int8(quantize_dynamic_int8(dense), spec, out_dir / "int8.safetensors")
        reloaded, _ = load_int8(path)
        variants.append(measure_variant("int8", reloaded, path, bundle, config.latency_repeats))
    add_static("", dense, spec)
    return variants


def variant_format(variant: VariantMetrics) -> str:
    return weights_format(Path(variant.checkpoint))


def load_variant(variant: VariantMetrics):
    return load_weights(Path(variant.checkpoint))[0]


# The candidate is chosen on validation accuracy, so the accuracy gate's test accuracy is data the
# choice never saw (choosing and gating on the same number lets the choice fit the test split's noise).
SELECTION_RULES = {
    "smallest_passing": "the smallest variant (bytes on disk) whose validation accuracy passes the accuracy "
                        "gate's floor (on validation data: at least min_accuracy and the teacher's validation "
                        "accuracy - max_drop); the dense student if none does. The gate then reads its test "
                        "accuracy, which the choice never saw",
    "most_accurate": "the variant with the highest validation accuracy; ties go to the smaller one. The gate "
                     "then reads its test accuracy, which the choice never saw",
}


def select_candidate(variants: list[VariantMetrics], teacher_val_accuracy: float, gates: GatesConfig,
                     rule: str) -> VariantMetrics:
    """The variant to ship under ``rule`` (``SELECTION_RULES``), judged on validation accuracy only
    (``teacher_val_accuracy``: the teacher's, for the floor's drop term)."""
    if rule == "most_accurate":
        return max(variants, key=lambda v: (v.val_accuracy, -v.size_bytes))
    floor = max(gates.min_accuracy, teacher_val_accuracy - gates.max_drop)
    passing = [v for v in variants if v.val_accuracy >= floor]
    return min(passing, key=lambda v: (v.size_bytes, -v.val_accuracy)) if passing else variants[0]


def compression_metrics(variants: list[VariantMetrics]) -> dict[str, float]:
    """Every variant's numeric measurements, named ``<variant>.<measurement>``."""
    return {f"{variant.name}.{key}": float(value) for variant in variants
            for key, value in variant.as_dict().items() if isinstance(value, (int, float))}
