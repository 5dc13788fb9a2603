"""The audit driver: every model the pipeline made, attacked and measured the same way.

Membership inference (LOSS, RMIA, LiRA against reference models trained on the population
split), leakage of the teacher's training data through each student, calibration, per-class
accuracy, FGSM robustness, and a model-extraction attack on the candidate. The pipeline and
``kdsec audit`` (a registered version alone) both run it through ``audit_models``.
"""

from __future__ import annotations

from collections.abc import Callable

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kdsec import cache, roles
from kdsec.audit.extraction import ExtractionResult, extraction_attack
from kdsec.audit.membership import MembershipResult, per_sample_loss, score_attack
from kdsec.audit.reference import (AuditSamples, Signals, audit_samples, lira_scores, reference_masks, rmia_scores,
                                  signals, train_references)
from kdsec.audit.trust import (Calibration, PerClass, Robustness, TemperatureScaling, calibration, fgsm_robustness,
                               per_class, temperature_scaling)
from kdsec.config import PipelineConfig, TrainConfig
from kdsec.data import DataBundle
from kdsec.models import ModelSpec, build_model, load_checkpoint
from kdsec.progress import progress
from kdsec.train import can_fit_together, predict_logits
from kdsec.trainers import student_spec, teacher_spec


@dataclass(frozen=True)
class ModelAudit:
    role: str
    test_accuracy: float
    # The strongest attack (highest TPR at low FPR, then AUC), as reports describe it; the membership
    # gate reads each metric's worst case over ``attacks`` instead (``kdsec.gates.worst_attacks``).
    membership: MembershipResult
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


def reference_plan(config: PipelineConfig, bundle: DataBundle) -> dict[str, tuple[ModelSpec, TrainConfig]]:
    """The architecture and training of each reference-model group (see ``roles.reference_group``)."""
    return {roles.TEACHER: (teacher_spec(config, bundle), config.teacher.train),
            roles.STUDENTS: (student_spec(config, bundle), config.student.train)}


def reference_count(config: PipelineConfig, group: str) -> int:
    """How many reference models ``group`` has: ``audit.reference_models``, capped for the teacher's
    group by ``audit.teacher_reference_models``. Model k is the same whatever the count (its half
    of the population and its seed depend on k alone), so caches are shared across counts."""
    count = config.audit.reference_models
    if group == roles.TEACHER and config.audit.teacher_reference_models is not None:
        return min(count, config.audit.teacher_reference_models)
    return count


def reference_jobs(config: PipelineConfig, bundle: DataBundle, width: int) -> list[tuple[str, list[int]]]:
    """(group, indices) training jobs for ``width`` workers. A group that trains together
    (``can_fit_together``: one vectorized step for each block of ``ENSEMBLE_BLOCK``) is one job,
    its blocks one after the other: small models are bound by Python's per-step overhead, and two
    threads would share one GIL (8 digits he_mlps: 1.0 s as one job of 8, 1.6 s as two at once). Any other group is split in ``width`` shares run at once, one torch
    thread each (4 digits teacher CNNs: 2.7 s as two jobs, 5.0 s as one)."""
    jobs = []
    for group, (spec, train) in reference_plan(config, bundle).items():
        indices = [int(i) for i in range(reference_count(config, group))]
        with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG: leave it as it was
            together = can_fit_together(build_model(spec), train)
        shares = [indices] if together else np.array_split(indices, width)
        jobs += [(group, [int(i) for i in share]) for share in shares if len(share)]
    return jobs


def reference_checkpoint(config: PipelineConfig, bundle: DataBundle, group: str, index: int) -> Path:
    """Where reference model ``index`` of ``group`` is cached (keyed by data, architecture,
    training, index and seed)."""
    spec, train = reference_plan(config, bundle)[group]
    return cache.reference_checkpoint(bundle.fingerprint, spec, train, index, config.seed, config.tracking.cache_dir)


ENSEMBLE_BLOCK = 4  # models a group that trains together trains at once, in blocks anchored at multiples of it


def reference_units(config: PipelineConfig, bundle: DataBundle, group: str, indices: list[int]) -> list[list[int]]:
    """The trainings that make references ``indices`` of ``group``, wherever they run: one model
    each, or, for a group that trains together (``can_fit_together``), the blocks of
    ``ENSEMBLE_BLOCK`` (clipped to ``reference_count``) that hold them. A vectorized step sums in
    another order for another number of models, so a model is trained with the same peers here,
    in another share or on a Dask worker: the same bytes (up to the CPU's instruction set)."""
    spec, train = reference_plan(config, bundle)[group]
    with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG: leave it as it was
        together = can_fit_together(build_model(spec), train)
    if not together:
        return [[int(index)] for index in indices]
    count = reference_count(config, group)
    blocks = sorted({int(index) // ENSEMBLE_BLOCK for index in indices})
    return [list(range(block * ENSEMBLE_BLOCK, min((block + 1) * ENSEMBLE_BLOCK, count))) for block in blocks]


def train_reference_models(config: PipelineConfig, bundle: DataBundle, group: str, indices: list[int]) -> None:
    """Reference models ``indices`` of ``group`` (and the rest of their ``reference_units``),
    each on its seeded half of the population split, stored at ``reference_checkpoint``."""
    spec, train = reference_plan(config, bundle)[group]
    samples = audit_samples(bundle, config.seed)
    masks = reference_masks(config.audit.reference_models, len(samples.y_population), config.seed)
    for unit in reference_units(config, bundle, group, indices):
        train_references(spec, train, samples.x_population, samples.y_population, masks[unit],
                         [config.seed * 1000 + index for index in unit],
                         [reference_checkpoint(config, bundle, group, index) for index in unit])


def reference_checkpoints(config: PipelineConfig, bundle: DataBundle, group: str,
                          step: Callable[[str], None] | None = None,
                          indices: list[int] | None = None) -> tuple[list[str], int]:
    """References ``indices`` (default: all ``reference_count``) of ``group``: the cached ones, the
    rest trained now together (``step`` hears of both; on the Dask cluster when
    ``compute.dask_address`` is set and ``indices`` are all), and how many were cached."""
    if config.compute.dask_address and indices is None:
        return all_reference_checkpoints(config, bundle, step, [group])[group]
    indices = list(range(reference_count(config, group))) if indices is None else indices
    total = len(indices)
    paths = [reference_checkpoint(config, bundle, group, index) for index in indices]
    missing = [(index, path) for index, path in zip(indices, paths) if not path.is_file()]
    if step:
        step(f"reference models ({group}): {total - len(missing)}/{total} cached")
    if missing:
        train_reference_models(config, bundle, group, [index for index, _ in missing])
        if step:
            step(f"reference models ({group}): {len(missing)} trained")
    return [str(path) for path in paths], total - len(missing)


def all_reference_checkpoints(config: PipelineConfig, bundle: DataBundle, step: Callable[[str], None] | None = None,
                              groups: list[str] | None = None) -> dict[str, tuple[list[str], int]]:
    """The references of ``groups`` (default: every group) as ``reference_checkpoints`` gives
    them, the missing ones trained as tasks on the Dask cluster at ``compute.dask_address``
    (``kdsec.compute``): the same models, bit for bit, as a local share trains, written to the
    same cache files here."""
    from kdsec.audit.reference import train_reference_share
    from kdsec.compute import run_tasks
    from kdsec.fileio import write_atomic

    plan = {group: value for group, value in reference_plan(config, bundle).items() if groups is None or group in groups}
    wanted = {group: list(range(reference_count(config, group))) for group in plan}
    paths = {group: {index: reference_checkpoint(config, bundle, group, index) for index in indices}
             for group, indices in wanted.items()}
    missing = {group: [index for index, path in paths[group].items() if not path.is_file()] for group in plan}
    units = [(group, *plan[group], unit) for group, indices in missing.items() if indices
             for unit in reference_units(config, bundle, group, indices)]
    if units:
        samples = audit_samples(bundle, config.seed)
        masks = reference_masks(config.audit.reference_models, len(samples.y_population), config.seed)
        jobs = [(f"reference-{group}", (spec, train, masks[unit], [config.seed * 1000 + index for index in unit]))
                for group, spec, train, unit in units]
        trained = run_tasks(config.compute.dask_address, config.compute.connect_timeout, train_reference_share,
                            (samples.x_population, samples.y_population), jobs,
                            step and (lambda line: step(f"reference models: {line}")))
        for (group, _, _, unit), blobs in zip(units, trained, strict=True):
            for index, blob in zip(unit, blobs, strict=True):
                write_atomic(paths[group][index], blob)
    return {group: ([str(paths[group][index]) for index in indices], len(indices) - len(missing[group]))
            for group, indices in wanted.items()}


def trained_split(role: str, config: PipelineConfig) -> str:
    """The split a pipeline model was trained on: distilled students (and their variants) on the
    distillation split, every other model on the training split."""
    return config.distill.transfer_set if roles.is_distilled(role) else "train"


def float_sources(models: dict) -> dict:
    """int8 variants have no input gradients: FGSM examples are crafted on the float model each
    was quantized from (``roles.variant_source``)."""
    return {role: models[roles.variant_source(role)] for role in models if roles.variant_source(role) in models}


def audit_models(models: dict, bundle: DataBundle, config: PipelineConfig, references: dict[str, list[str]],
                 surrogates: dict | None = None) -> list[ModelAudit]:
    """Audit each model; the reference models of each architecture are loaded and queried once
    per member split."""
    splits = {role: trained_split(role, config) for role in models}
    needed = set(splits.values()) | {"train"}
    samples = {split: audit_samples(bundle, config.seed, split) for split in needed}
    reference: dict[tuple[str, str], Signals] = {}
    for group in {roles.reference_group(role) for role in models}:
        if references.get(group):
            loaded = [load_checkpoint(Path(path))[0] for path in references[group]]
            reference.update({(group, split): signals(loaded, samples[split]) for split in needed})
    audits = []
    with progress("audit", len(models)) as advance:
        for role, model in models.items():
            group = roles.reference_group(role)
            teacher_view = None if role == roles.TEACHER else (samples["train"], reference.get((group, "train")))
            audits.append(audit_model(role, model, bundle, config, samples[splits[role]],
                                      reference.get((group, splits[role])), (surrogates or {}).get(role),
                                      splits[role], teacher_view))
            advance(role)
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


@dataclass(frozen=True)
class AuditOutcome:
    """Every model's audit (the candidate's under its own role and again as ``candidate``), the
    extraction attack on the candidate, and what the audit cost next to teacher training."""

    audits: list[ModelAudit]
    extraction: list[ExtractionResult]
    seconds: float
    teacher_train_seconds: float
    reference_models: int
    dp_audits: list = field(default_factory=list)  # DPAudit: the one-run audit of a DP run's claim

    @property
    def by_role(self) -> dict[str, ModelAudit]:
        return {audit.role: audit for audit in self.audits}

    @property
    def candidate(self) -> ModelAudit:
        return self.by_role[roles.CANDIDATE]

    @property
    def ratio_to_teacher_training(self) -> float:
        return self.seconds / max(self.teacher_train_seconds, 1e-9)

    def metrics(self) -> dict[str, float]:
        """Per model: every attack's AUC / TPRs / balanced accuracy, teacher leakage, ECE, worst
        class gap; per extraction defence: stolen accuracy and fidelity; the audit's cost."""
        rows: dict[str, float] = {}
        for audit in self.audits:
            for name, result in audit.attacks.items():
                for metric in ("auc", "tpr_at_low_fpr", "tpr_at_0_1_fpr", "balanced_accuracy"):
                    rows[f"{audit.role}.{name}.{metric}"] = getattr(result, metric)
            if audit.teacher_leakage is not None:
                for metric in ("auc", "tpr_at_low_fpr"):
                    rows[f"{audit.role}.teacher_leakage.{metric}"] = getattr(audit.teacher_leakage, metric)
            rows[f"{audit.role}.ece"] = audit.calibration.ece
            rows[f"{audit.role}.worst_class_gap"] = audit.per_class.worst_class_gap
        for result in self.extraction:
            for metric in ("stolen_accuracy", "fidelity"):
                rows[f"extraction.{result.defense}.{metric}"] = getattr(result, metric)
        for dp in self.dp_audits:
            rows[f"dp_audit.{dp.model}.epsilon_lower"] = dp.epsilon_lower
        return {**rows, "audit_seconds": self.seconds, "audit_to_teacher_train_ratio": self.ratio_to_teacher_training}


def audit_pipeline(config: PipelineConfig, bundle: DataBundle, models: dict, references: dict[str, list[str]],
                   candidate_role: str, teacher_train_seconds: float, reference_seconds: float = 0.0) -> AuditOutcome:
    """Audit every model of a run and attack the candidate (``candidate_role``) for extraction.
    ``reference_seconds``: what training (or loading) its reference models took, part of the audit's cost."""
    started = time.perf_counter()
    audits = audit_models(models, bundle, config, references, float_sources(models))
    extraction = extraction_audit(config, bundle, models[candidate_role])
    audits.append(replace(next(a for a in audits if a.role == candidate_role), role=roles.CANDIDATE))
    dp_audits = []
    if roles.DP_STUDENT in models and config.audit.dp_canaries:
        from kdsec.audit.dp_audit import dp_canary_audits

        dp_audits = dp_canary_audits(config, bundle)
    return AuditOutcome(audits, extraction, reference_seconds + time.perf_counter() - started, teacher_train_seconds,
                        config.audit.reference_models, dp_audits)
