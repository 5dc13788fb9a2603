"""The pipeline's stages as plain functions: typed inputs in, typed results out, files on disk.

Prefect tasks in ``tasks/`` wrap these with retries, caching and tracking; a notebook can call
them directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdsec.audit.membership import MembershipResult, per_sample_loss, score_attack
from kdsec.audit.reference import (AuditSamples, Signals, audit_samples, lira_scores, reference_masks, rmia_scores,
                                  signals, train_reference)
from kdsec.audit.extraction import ExtractionResult, extraction_attack
from kdsec.audit.trust import (Calibration, PerClass, Robustness, TemperatureScaling, calibration, fgsm_robustness,
                               per_class, temperature_scaling)
from kdsec.compress import (VariantMetrics, global_magnitude_prune, load_int8, load_weights, measure_variant,
                            quantize_dynamic_int8, save_int8, structured_prune, weights_format)
from kdsec.compress.static_quant import has_conv, load_static_int8, quantize_static_int8, save_static_int8
from kdsec.compress.structured import SUPPORTED as STRUCTURED_ARCHS
from kdsec.config import CompressConfig, GatesConfig, PipelineConfig, TeacherConfig, TrainConfig
from kdsec.crypto.keys import load_or_create_signer, local_key_provider
from kdsec.crypto.package import AtRestResult, protect_and_verify
from kdsec.crypto.he import HE_FRIENDLY_ARCHS, HEResult, encrypted_inference
from kdsec.data import DataBundle
from kdsec.errors import ConfigError
from kdsec.distill import OfflineDistiller, signals_key
from kdsec.models import ModelSpec, build_model, count_flops, count_parameters, load_checkpoint, save_checkpoint
from kdsec.sweep import MemberResult, SweepMember
from kdsec.train import Objective, cross_entropy_objective, evaluate, fit, predict_logits, seed_everything

CODE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainedModel:
    role: str
    checkpoint: str
    spec_json: str
    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    params: int
    train_seconds: float
    history: list[dict[str, float]] = field(repr=False, default_factory=list)
    privacy: dict[str, float] = field(default_factory=dict)  # DP-SGD accounting (ε, δ, noise), if any

    def load(self):
        return load_checkpoint(Path(self.checkpoint))[0]


def code_version(*relative: str) -> str:
    """Hash of the named source files/folders of kdsec: part of cache keys, so code changes retrain."""
    digest = hashlib.sha256()
    for name in relative:
        path = CODE_DIR / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def teacher_cache_key(fingerprint: str, config: TeacherConfig, seed: int) -> str:
    """Same data + same teacher config + same training code -> same teacher."""
    code = code_version("models", "train.py", "data")
    payload = f"{fingerprint}|{config.model_dump_json()}|{seed}|{code}"
    return "teacher-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def _train(role: str, spec: ModelSpec, bundle: DataBundle, train: TrainConfig, seed: int, checkpoint: Path,
           objective=None, split: str = "train") -> TrainedModel:
    seed_everything(seed)
    model = build_model(spec)
    started = time.perf_counter()
    kwargs = {"objective": objective} if objective is not None else {}
    x_train, y_train = bundle.split(split)
    result = fit(model, x_train, y_train, bundle.x_val, bundle.y_val, train, seed=seed, label=role, **kwargs)
    seconds = time.perf_counter() - started
    save_checkpoint(model, spec, checkpoint)
    return TrainedModel(
        role=role, checkpoint=str(checkpoint), spec_json=spec.to_json(),
        test_accuracy=evaluate(model, bundle.x_test, bundle.y_test)[1],
        val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch, epochs_run=result.epochs_run,
        params=count_parameters(model)[0], train_seconds=seconds, history=result.history,
    )


def preflight(config: PipelineConfig) -> None:
    """Fail in seconds, not after training, on what a config names but cannot be had: unknown
    registry names, a loss or a stage the student cannot take (spatial features, structured
    pruning, homomorphic inference), a malformed or exposed encryption key."""
    from kdsec.data import DATASETS
    from kdsec.distill import LOSSES
    from kdsec.models import MODELS

    DATASETS.get(config.data.name)
    MODELS.get(config.teacher.arch)
    MODELS.get(config.student.arch)
    if LOSSES.get(config.distill.loss).feature == "spatial" and config.student.arch == "he_mlp":
        raise ConfigError(f"distill.loss '{config.distill.loss}' needs spatial feature maps, but the he_mlp "
                          "student has none; use fitnets or hinton_kd, or a conv student")
    if config.compress.structured > 0 and config.student.arch not in STRUCTURED_ARCHS:
        raise ConfigError(f"compress.structured: structured pruning supports {', '.join(STRUCTURED_ARCHS)}, "
                          f"not the '{config.student.arch}' student; set compress.structured=0")
    if config.encrypt.he.enabled and config.student.arch not in HE_FRIENDLY_ARCHS:
        raise ConfigError(f"student.arch '{config.student.arch}' has no homomorphic form (ReLU, max-pool); "
                          f"use an HE-friendly student ({', '.join(HE_FRIENDLY_ARCHS)}) or set "
                          "encrypt.he.enabled=false to ship it without encrypted inference")
    local_key_provider(config.encrypt.key_env, config.encrypt.key_file)
    load_or_create_signer(config.encrypt.signing_key_env, config.encrypt.signing_key_file)


def switched_off_gates(config: PipelineConfig) -> frozenset[str]:
    """Gates whose stage the config turns off: skipped, not failed, and the report says so."""
    return frozenset() if config.encrypt.he.enabled else frozenset({"he"})


def arch_options(arch: str, section) -> dict:
    """The options of ``arch`` taken from a teacher/student config section."""
    if arch == "resnet18":
        return {"width": section.width}
    if arch == "he_mlp":
        hidden = list(getattr(section, "hidden", [32]))
        pool = getattr(section, "pool", 1)
        return {"hidden": hidden, **({"pool": pool} if pool > 1 else {})}
    return {"channels": list(section.channels), "fc": section.fc}


def teacher_spec(config: PipelineConfig, bundle: DataBundle) -> ModelSpec:
    return ModelSpec(config.teacher.arch, bundle.input_shape, bundle.num_classes,
                     arch_options(config.teacher.arch, config.teacher))


def student_spec(config: PipelineConfig, bundle: DataBundle) -> ModelSpec:
    return ModelSpec(config.student.arch, bundle.input_shape, bundle.num_classes,
                     arch_options(config.student.arch, config.student))


def train_teacher(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    return _train("teacher", teacher_spec(config, bundle), bundle, config.teacher.train, config.seed, checkpoint)


def train_scratch_student(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    """The student architecture trained on hard labels alone: the baseline KD must beat."""
    return _train("scratch_student", student_spec(config, bundle), bundle, config.student.train, config.seed,
                  checkpoint)


def distiller_for(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel,
                  signals: str | Path | None = None) -> OfflineDistiller:
    """The teacher's signals on the distillation split (``distill.transfer_set``): read from the
    stored file when given, else computed once here."""
    if signals is not None:
        return OfflineDistiller.load(Path(signals), config.distill)
    return OfflineDistiller(teacher.load(), bundle.split(config.distill.transfer_set)[0], config.distill)


def teacher_signals_key(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel) -> str:
    """Same teacher weights + same transfer inputs + same tapped layer/target + same code → same signals."""
    digest = hashlib.sha256(Path(teacher.checkpoint).read_bytes()).hexdigest()
    payload = (f"{digest}|{bundle.fingerprint}|{config.distill.transfer_set}|{signals_key(config.distill)}|"
               f"{code_version('distill', 'models')}")
    return "signals-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def teacher_signals_path(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel) -> Path:
    """Where the teacher's signals for ``config.distill`` are stored (named by their cache key)."""
    key = teacher_signals_key(config, bundle, teacher)
    return Path(config.tracking.cache_dir) / "signals" / f"{key}.safetensors"


def store_teacher_signals(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel, path: Path) -> str:
    """Compute the teacher's logits (and the feature target of a feature loss) on the transfer
    split once and store them as safetensors, for every student that distils from them."""
    return str(distiller_for(config, bundle, teacher).save(path))


def distill_student(config: PipelineConfig, bundle: DataBundle, teacher: TrainedModel, checkpoint: Path,
                    signals: str | Path | None = None, role: str = "kd_student") -> TrainedModel:
    return _train(role, student_spec(config, bundle), bundle, config.student.train, config.seed,
                  checkpoint, objective=distiller_for(config, bundle, teacher, signals).objective,
                  split=config.distill.transfer_set)


def distill_member(config: PipelineConfig, bundle: DataBundle, member: SweepMember, signals: str | Path,
                   checkpoint: Path, torch_threads: int = 0) -> tuple[TrainedModel, MemberResult]:
    """One sweep member: the student at ``member``'s width distilled with its T/α/loss from the
    stored teacher signals (the teacher itself is never run)."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    member_config = member.apply(config)
    trained = distill_student(member_config, bundle, None, checkpoint, signals, role=f"sweep:{member.name}")
    result = MemberResult(member=member, checkpoint=trained.checkpoint, val_accuracy=trained.val_accuracy,
                          test_accuracy=trained.test_accuracy, params=trained.params,
                          size_bytes=Path(checkpoint).stat().st_size,
                          flops=count_flops(build_model(ModelSpec.from_json(trained.spec_json)), bundle.input_shape),
                          train_seconds=trained.train_seconds,
                          epochs_run=trained.epochs_run)
    return trained, result


def train_dp_student(config: PipelineConfig, bundle: DataBundle, checkpoint: Path) -> TrainedModel:
    """The student architecture trained with DP-SGD on the training split's hard labels
    (``student.dp``); its ε is what the accountant reports, not the target."""
    from kdsec.dp_sgd import fit_private

    dp, spec = config.student.dp, student_spec(config, bundle)
    seed_everything(config.seed)
    model = build_model(spec)
    started = time.perf_counter()
    result = fit_private(model, bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, dp, config.seed,
                         label="dp_student")
    seconds = time.perf_counter() - started
    save_checkpoint(model, spec, checkpoint)
    return TrainedModel(
        role="dp_student", checkpoint=str(checkpoint), spec_json=spec.to_json(),
        test_accuracy=evaluate(model, bundle.x_test, bundle.y_test)[1], val_accuracy=result.best_val_accuracy,
        best_epoch=result.best_epoch, epochs_run=result.epochs_run, params=count_parameters(model)[0],
        train_seconds=seconds, history=result.history, privacy=result.as_dict(),
    )


def compress_student(config: CompressConfig, bundle: DataBundle, student: TrainedModel, finetune: TrainConfig,
                     seed: int, out_dir: Path, objective: Objective = cross_entropy_objective,
                     split: str = "train") -> list[VariantMetrics]:
    """Dense; globally magnitude-pruned (zeros); structurally pruned (smaller layers); and int8
    copies of the pruned ones — each fine-tuned with ``objective`` on ``split`` (e.g. the
    distiller's, so pruned students keep learning from the teacher) and measured."""
    dense, spec = load_checkpoint(Path(student.checkpoint))
    variants = [measure_variant("dense", dense, Path(student.checkpoint), bundle.x_test, bundle.y_test,
                                config.latency_repeats)]
    tune = finetune.model_copy(update={"lr": finetune.lr / 3})

    def finetune_model(model, epochs: int) -> None:
        if epochs:
            seed_everything(seed)
            fit(model, *bundle.split(split), bundle.x_val, bundle.y_val,
                tune.model_copy(update={"epochs": epochs, "patience": epochs}), objective, seed=seed,
                label="prune-finetune")

    calibration = bundle.split(split)[0][:config.calibration_samples]

    def add_static(name: str, model, model_spec: ModelSpec) -> None:
        """Static int8 (calibrated activations) for conv students; measured as reloaded from its file."""
        if not (config.static_int8 and has_conv(model)):
            return
        path = save_static_int8(quantize_static_int8(model, calibration), model_spec,
                                out_dir / f"{name + '_' if name else ''}static_int8.safetensors")
        reloaded, _ = load_static_int8(path)
        variants.append(measure_variant(path.stem, reloaded, path, bundle.x_test, bundle.y_test,
                                        config.latency_repeats))

    def add(name: str, model, model_spec: ModelSpec, quantize: bool) -> None:
        path = save_checkpoint(model, model_spec, out_dir / f"{name}.safetensors")
        variants.append(measure_variant(name, model, path, bundle.x_test, bundle.y_test, config.latency_repeats))
        add_static(name, model, model_spec)
        if quantize:
            int8_path = save_int8(quantize_dynamic_int8(model), model_spec, out_dir / f"{name}_int8.safetensors")
            reloaded, _ = load_int8(int8_path)  # measure what ships: the model rebuilt from the file
            variants.append(measure_variant(f"{name}_int8", reloaded, int8_path, bundle.x_test, bundle.y_test,
                                            config.latency_repeats))

    if config.sparsity > 0:
        pruned, _ = load_checkpoint(Path(student.checkpoint))
        # Iterative pruning shares the fine-tuning epochs out over its rounds.
        per_round = -(-config.finetune_epochs // config.prune_steps)
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
        variants.append(measure_variant("int8", reloaded, path, bundle.x_test, bundle.y_test,
                                        config.latency_repeats))
    add_static("", dense, spec)
    return variants


def variant_format(variant: VariantMetrics) -> str:
    return weights_format(Path(variant.checkpoint))


def load_variant(variant: VariantMetrics):
    return load_weights(Path(variant.checkpoint))[0]


SELECTION_RULES = {
    "smallest_passing": "the smallest variant (bytes on disk) whose test accuracy passes the accuracy gate; "
                        "the dense student if none does",
    "most_accurate": "the variant with the highest test accuracy; ties go to the smaller one",
}


def select_candidate(variants: list[VariantMetrics], teacher_accuracy: float, gates: GatesConfig,
                     rule: str) -> VariantMetrics:
    if rule == "most_accurate":
        return max(variants, key=lambda v: (v.test_accuracy, -v.size_bytes))
    floor = max(gates.min_accuracy, teacher_accuracy - gates.max_drop)
    passing = [v for v in variants if v.test_accuracy >= floor]
    return min(passing, key=lambda v: (v.size_bytes, -v.test_accuracy)) if passing else variants[0]


def protect_at_rest(config: PipelineConfig, candidate: VariantMetrics, destination: Path, version: str,
                    metadata: dict) -> AtRestResult:
    """The candidate as a signed, envelope-encrypted package (weights sealed, metadata signed)."""
    encrypt = config.encrypt
    provider = local_key_provider(encrypt.key_env, encrypt.key_file)
    signer = load_or_create_signer(encrypt.signing_key_env, encrypt.signing_key_file)
    model_card = {**metadata, "variant": candidate.name, "format": variant_format(candidate)}
    return protect_and_verify(destination, {"weights.safetensors": Path(candidate.checkpoint).read_bytes()},
                              {"model.json": json.dumps(model_card, indent=2, sort_keys=True).encode()},
                              name=config.tracking.registered_model, version=version, provider=provider,
                              signer=signer, key_source=provider.key.source)


def homomorphic_inference(config: PipelineConfig, bundle: DataBundle, candidate: VariantMetrics,
                          package_dir: Path | None = None) -> HEResult:
    if not config.encrypt.he.enabled:
        return HEResult(runs=[])
    inputs = bundle.x_test
    if config.encrypt.he.max_samples:
        inputs = inputs[: config.encrypt.he.max_samples]
    return encrypted_inference(load_variant(candidate), inputs, config.encrypt.he,
                               package_dir if config.encrypt.he.log_packages else None)


@dataclass(frozen=True)
class ModelAudit:
    role: str
    test_accuracy: float
    membership: MembershipResult  # the strongest attack (highest TPR at low FPR, then AUC)
    calibration: Calibration
    per_class: PerClass
    attacks: dict[str, MembershipResult] = field(default_factory=dict)
    temperature: TemperatureScaling | None = None
    robustness: Robustness | None = None
    member_split: str = "train"  # the split the model was trained on, where its members come from
    # Membership in the *teacher's* training split inferred from this model's outputs (students
    # only): the strongest attack, and every attack by name.
    teacher_leakage: MembershipResult | None = None
    teacher_leakage_attacks: dict[str, MembershipResult] = field(default_factory=dict)


def variant_source_role(role: str) -> str | None:
    """The audited role an int8 variant was quantized from (``variant:pruned50_int8`` → ``variant:pruned50``)."""
    if not role.endswith("int8"):
        return None
    source = role.removeprefix("variant:").removesuffix("int8").rstrip("_").removesuffix("static").rstrip("_")
    return f"variant:{source}" if source else "kd_student"


def reference_group(role: str) -> str:
    """Which reference models an audited model is compared with: its own architecture's."""
    return "teacher" if role == "teacher" else "student"


def reference_cache_key(fingerprint: str, spec: ModelSpec, train: TrainConfig, index: int, seed: int) -> str:
    code = code_version("models", "train.py", "data", "audit/reference.py")
    payload = f"{fingerprint}|{spec.to_json()}|{train.model_dump_json()}|{index}|{seed}|{code}"
    return "reference-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def reference_plan(config: PipelineConfig, bundle: DataBundle) -> dict[str, tuple[ModelSpec, TrainConfig]]:
    return {"teacher": (teacher_spec(config, bundle), config.teacher.train),
            "student": (student_spec(config, bundle), config.student.train)}


def train_reference_model(config: PipelineConfig, bundle: DataBundle, group: str, index: int,
                          checkpoint: Path) -> str:
    spec, train = reference_plan(config, bundle)[group]
    samples = audit_samples(bundle, config.seed)
    masks = reference_masks(config.audit.reference_models, len(samples.y_population), config.seed)
    return str(train_reference(spec, train, samples.x_population, samples.y_population, masks[index],
                               config.seed * 1000 + index, checkpoint))


def reference_checkpoint(config: PipelineConfig, bundle: DataBundle, group: str, index: int) -> Path:
    """Where reference model ``index`` of ``group`` is cached (keyed like the Prefect cache)."""
    spec, train = reference_plan(config, bundle)[group]
    key = reference_cache_key(bundle.fingerprint, spec, train, index, config.seed)
    return Path(config.tracking.cache_dir) / "references" / key / "model.safetensors"


def trained_split(role: str, config: PipelineConfig) -> str:
    """The split a pipeline model was trained on: distilled students (and their variants) on the
    distillation split, every other model on the training split."""
    distilled = role in ("kd_student", "candidate") or role.startswith("variant:")
    return config.distill.transfer_set if distilled else "train"


def audit_models(models: dict, bundle: DataBundle, config: PipelineConfig, references: dict[str, list[str]],
                 surrogates: dict | None = None) -> list[ModelAudit]:
    """Audit each model; the reference models of each architecture are loaded and queried once
    per member split."""
    splits = {role: trained_split(role, config) for role in models}
    needed = set(splits.values()) | {"train"}
    samples = {split: audit_samples(bundle, config.seed, split) for split in needed}
    reference: dict[tuple[str, str], Signals] = {}
    for group in {reference_group(role) for role in models}:
        if references.get(group):
            loaded = [load_checkpoint(Path(path))[0] for path in references[group]]
            reference.update({(group, split): signals(loaded, samples[split]) for split in needed})
    audits = []
    for role, model in models.items():
        group = reference_group(role)
        teacher_view = None if role == "teacher" else (samples["train"], reference.get((group, "train")))
        audits.append(audit_model(role, model, bundle, config, samples[splits[role]],
                                  reference.get((group, splits[role])), (surrogates or {}).get(role),
                                  splits[role], teacher_view))
    return audits


def membership_attacks(model, samples: AuditSamples, reference: Signals | None, config: PipelineConfig,
                       class_names: list[str]) -> dict[str, MembershipResult]:
    """LOSS, and RMIA + LiRA given reference-model signals, on ``samples``' members vs non-members."""
    audit = config.audit
    common = {"bootstrap": audit.bootstrap, "seed": config.seed, "member_labels": samples.y_members,
              "non_member_labels": samples.y_non_members, "class_names": class_names}
    attacks = {"loss": score_attack(-per_sample_loss(model, samples.x_members, samples.y_members),
                                    -per_sample_loss(model, samples.x_non_members, samples.y_non_members),
                                    audit.low_fpr, "loss", **common)}
    if reference is not None:
        target = signals(model, samples)
        masks = reference_masks(len(reference.members), len(samples.y_population), config.seed)
        attacks["rmia"] = score_attack(*rmia_scores(target, reference, masks, audit.rmia_a, audit.rmia_gamma),
                                       audit.low_fpr, "rmia", **common)
        attacks["lira"] = score_attack(*lira_scores(target, reference), audit.low_fpr, "lira", **common)
    return attacks


def strongest(attacks: dict[str, MembershipResult]) -> MembershipResult:
    """The attack with the highest TPR at low FPR, then the highest AUC."""
    return max(attacks.values(), key=lambda result: (result.tpr_at_low_fpr, result.auc))


def audit_model(role: str, model, bundle: DataBundle, config: PipelineConfig, samples: AuditSamples,
                reference: Signals | None = None, surrogate=None, member_split: str = "train",
                teacher_view: tuple[AuditSamples, Signals | None] | None = None) -> ModelAudit:
    """Membership (members = a subset of ``member_split``, non-members = audit holdout),
    teacher leakage through this model (``teacher_view``: the teacher's members and the matching
    reference signals), calibration before/after temperature scaling, per-class accuracy and
    FGSM robustness (crafted on ``surrogate`` if the model has no gradients)."""
    audit = config.audit
    logits = predict_logits(model.cpu(), bundle.x_test)
    attacks = membership_attacks(model, samples, reference, config, bundle.class_names)
    leakage: dict[str, MembershipResult] = {}
    if teacher_view is not None:
        # Trained on the teacher's own split, the two questions coincide: reuse the result.
        leakage = attacks if member_split == "train" else membership_attacks(model, *teacher_view, config,
                                                                              bundle.class_names)
    return ModelAudit(
        role=role,
        test_accuracy=float((logits.argmax(1) == bundle.y_test).mean()),
        membership=strongest(attacks),
        calibration=calibration(logits, bundle.y_test),
        per_class=per_class(logits.argmax(1), bundle.y_test, bundle.class_names),
        attacks=attacks,
        temperature=temperature_scaling(predict_logits(model.cpu(), bundle.x_val), bundle.y_val, logits,
                                        bundle.y_test),
        robustness=fgsm_robustness(model, bundle.x_test, bundle.y_test, list(audit.fgsm_epsilons), surrogate,
                                   "its float source"),
        member_split=member_split,
        teacher_leakage=strongest(leakage) if leakage else None,
        teacher_leakage_attacks=leakage,
    )


def extraction_audit(config: PipelineConfig, bundle: DataBundle, victim) -> list[ExtractionResult]:
    """A knockoff attacker with ``audit.extraction_queries`` queries against the candidate;
    the copy is the student architecture, evaluated on the audit holdout (never queried)."""
    audit = config.audit
    if not audit.extraction_queries:
        return []
    rng = np.random.default_rng(config.seed)
    if audit.extraction_source == "population":
        pool = audit_samples(bundle, config.seed).x_population
        queries = pool[rng.choice(len(pool), size=min(audit.extraction_queries, len(pool)), replace=False)]
    else:
        queries = rng.uniform(0.0, 1.0, size=(audit.extraction_queries, *bundle.input_shape)).astype(np.float32)
    return extraction_attack(victim, queries, audit.extraction_source, bundle.x_holdout, bundle.y_holdout,
                             student_spec(config, bundle), config.student.train, audit.extraction_decimals,
                             config.seed)
