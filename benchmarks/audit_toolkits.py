"""Our membership attacks next to the Adversarial Robustness Toolbox's on the same targets.

Targets: the default digits teacher, scratch student, KD student and the pruned + int8 candidate.
Members are a training subset, non-members the audit holdout (as in the pipeline). ART's
black-box attacks are *supervised*: they learn from half of the true member / non-member labels,
an adversary stronger than ours (LOSS needs nothing; RMIA and LiRA need only population data).
ART is cross-fitted (trained on one half, scored on the other, then swapped), so every attack
scores every audited sample and all columns see the same samples.

    uv run --group bench python benchmarks/audit_toolkits.py   (or: make bench-audit)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kdsec import trainers
from kdsec.audit import run as audit_run
from kdsec.compress import candidates
from kdsec.audit.membership import per_sample_loss, score_attack
from kdsec.audit.reference import audit_samples, lira_scores, reference_masks, rmia_scores, signals
from kdsec.config import load_config
from kdsec.data import prepare_data
from kdsec.models import load_checkpoint
from kdsec.train import predict_logits


def art_attacks(model: nn.Module, samples, train_half: np.ndarray, test_half: np.ndarray, seed: int) -> dict:
    """ART's rule-based and black-box (loss, prediction) membership attacks, trained on
    ``train_half`` of the members and non-members: their scores on ``test_half``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.inference.membership_inference import (MembershipInferenceBlackBox,
                                                                MembershipInferenceBlackBoxRuleBased)
        from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model.cpu().eval(), loss=nn.CrossEntropyLoss(),
                                   input_shape=samples.x_members.shape[1:], nb_classes=10, clip_values=(0.0, 1.0))
    xm, ym, xn, yn = samples.x_members, samples.y_members, samples.x_non_members, samples.y_non_members
    one_hot = np.eye(10, dtype=np.float32)
    scores = {}
    rule = MembershipInferenceBlackBoxRuleBased(classifier)
    scores["ART rule-based"] = (rule.infer(xm[test_half], one_hot[ym[test_half]]).ravel(),
                                rule.infer(xn[test_half], one_hot[yn[test_half]]).ravel())
    for input_type, model_type in (("loss", "rf"), ("prediction", "rf"), ("prediction", "nn")):
        np.random.seed(seed)
        torch.manual_seed(seed)
        attack = MembershipInferenceBlackBox(classifier, input_type=input_type, attack_model_type=model_type)
        attack.fit(xm[train_half], one_hot[ym[train_half]], xn[train_half], one_hot[yn[train_half]])
        scores[f"ART black-box {input_type}/{model_type}"] = tuple(
            attack.infer(x[test_half], one_hot[y[test_half]], probabilities=True)[:, -1].ravel()
            for x, y in ((xm, ym), (xn, yn)))
    return scores


def main() -> None:
    console = Console()
    config = load_config(None, [])
    bundle = prepare_data(config.data)
    folder = Path(tempfile.mkdtemp(prefix="kdsec-toolkits-"))
    with console.status("training the default teacher, students and candidate"):
        teacher = trainers.train_teacher(config, bundle, folder / "teacher.safetensors")
        scratch = trainers.train_scratch_student(config, bundle, folder / "scratch.safetensors")
        student = trainers.distill_student(config, bundle, teacher, folder / "kd.safetensors")
        variants = candidates.compress_student(config.compress, bundle, student, config.student.train, config.seed,
                                           folder, trainers.distiller_for(config, bundle, teacher).objective)
    targets = {"teacher": teacher.load(), "scratch_student": scratch.load(), "kd_student": student.load(),
               f"candidate ({variants[-1].name})": candidates.load_variant(variants[-1])}
    samples = audit_samples(bundle, config.seed)
    count = len(samples.y_members)
    order = np.random.default_rng(config.seed).permutation(count)
    train_half, test_half = np.sort(order[: count // 2]), np.sort(order[count // 2:])
    reference = {}
    with console.status(f"{config.audit.reference_models} reference models per architecture (cached)"):
        for group in ("teacher", "student"):
            paths, _ = audit_run.reference_checkpoints(config, bundle, group)
            reference[group] = signals([load_checkpoint(path)[0] for path in paths], samples)
    masks = reference_masks(config.audit.reference_models, len(samples.y_population), config.seed)

    results: dict[str, dict[str, tuple[float, float]]] = {}
    for role, model in targets.items():
        ref = reference["teacher" if role == "teacher" else "student"]
        target = signals(model, samples)
        ours = {"ours LOSS": (-per_sample_loss(model, samples.x_members, samples.y_members),
                              -per_sample_loss(model, samples.x_non_members, samples.y_non_members)),
                "ours RMIA": rmia_scores(target, ref, masks, config.audit.rmia_a, config.audit.rmia_gamma),
                "ours LiRA": lira_scores(target, ref)}
        with console.status(f"ART attacks on {role}"):
            folds = [art_attacks(model, samples, train_half, test_half, config.seed),
                     art_attacks(model, samples, test_half, train_half, config.seed)]
        art = {}
        for name in folds[0]:
            member, non_member = np.empty(count), np.empty(count)
            for (scored_m, scored_n), half in zip((folds[0][name], folds[1][name]), (test_half, train_half)):
                member[half], non_member[half] = scored_m, scored_n
            art[name] = (member, non_member)
        scored = {**ours, **art}
        results[role] = {name: (r.auc, r.tpr_at_low_fpr) for name, (m, n) in scored.items()
                         for r in [score_attack(m, n, config.audit.low_fpr, name)]}
        accuracy = float((predict_logits(model.cpu(), bundle.x_test).argmax(1) == bundle.y_test).mean())
        console.print(f"{role}: test accuracy {accuracy:.4f}")

    attacks = list(next(iter(results.values())))
    table = Table(title=f"Membership AUC / TPR@{config.audit.low_fpr:g} FPR on digits "
                        f"({count} members vs {count} non-members; ART cross-fitted on halves of {len(train_half)})")
    table.add_column("attack")
    for role in results:
        table.add_column(role, justify="right")
    for attack in attacks:
        table.add_row(attack, *(f"{results[role][attack][0]:.3f} / {results[role][attack][1]:.3f}"
                                for role in results))
    def strongest(role: str, prefix: str) -> tuple[float, float]:
        return max((v for k, v in results[role].items() if k.startswith(prefix)), key=lambda v: (v[1], v[0]))

    strongest_ours = {role: strongest(role, "ours") for role in results}
    strongest_art = {role: strongest(role, "ART") for role in results}
    table.add_row("strongest ours (by TPR, AUC)", *(f"{strongest_ours[r][0]:.3f} / {strongest_ours[r][1]:.3f}"
                                                    for r in results))
    table.add_row("strongest ART", *(f"{strongest_art[r][0]:.3f} / {strongest_art[r][1]:.3f}" for r in results))
    console.print(table)


if __name__ == "__main__":
    main()
