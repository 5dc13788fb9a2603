"""Our membership attacks next to the Adversarial Robustness Toolbox's and ML Privacy Meter's on
the same targets (Privacy Meter's population and reference attacks: ``privacy_meter_peer.py``).

Targets: a config's teacher, scratch student, KD student and compressed candidate (digits by
default; the real MNIST or Fashion-MNIST with --config configs/mnist.yaml --data-root <folder>).
Members are a training subset, non-members the audit holdout (as in the pipeline). ART's
black-box attacks are *supervised*: they learn from half of the true member / non-member labels,
an adversary stronger than ours (LOSS needs nothing; RMIA and LiRA need only population data).
ART is cross-fitted (trained on one half, scored on the other, then swapped), so every attack
scores every audited sample and all columns see the same samples — except ART's label-only
decision-boundary attack (HopSkipJump distances, hundreds of queries a sample), which runs on
--boundary-samples members and as many non-members (ours are scored on that subset too, and the
verdict compares it with ours on the same samples). Every result: AUC and TPR at 1 % and 0.1 %
FPR with bootstrap 95 % intervals; RMIA with 1, 2, 4 and 8 reference models.

    uv run --group bench python benchmarks/audit_toolkits.py   (or: make bench-audit)
    make bench-audit ARGS="--config configs/mnist.yaml --data-root /tmp/realdata"
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

from privacy_meter_peer import privacy_meter_attacks  # benchmarks/ is the script's folder: on sys.path


def art_attacks(model: nn.Module, samples, train_half: np.ndarray, test_half: np.ndarray, seed: int) -> dict:
    """ART's rule-based and black-box (loss, prediction) membership attacks, trained on
    ``train_half`` of the members and non-members: their scores on ``test_half``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.inference.membership_inference import (LabelOnlyGapAttack, MembershipInferenceBlackBox,
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
    gap = LabelOnlyGapAttack(classifier)
    scores["ART label-only gap"] = (gap.infer(xm[test_half], ym[test_half]).ravel().astype(float),
                                    gap.infer(xn[test_half], yn[test_half]).ravel().astype(float))
    for input_type, model_type in ((t, m) for t in ("loss", "prediction") for m in ("rf", "gb", "nn")):
        np.random.seed(seed)
        torch.manual_seed(seed)
        attack = MembershipInferenceBlackBox(classifier, input_type=input_type, attack_model_type=model_type)
        attack.fit(xm[train_half], one_hot[ym[train_half]], xn[train_half], one_hot[yn[train_half]])
        scores[f"ART black-box {input_type}/{model_type}"] = tuple(
            attack.infer(x[test_half], one_hot[y[test_half]], probabilities=True)[:, -1].ravel()
            for x, y in ((xm, ym), (xn, yn)))
    return scores


def label_only_boundary(model: nn.Module, samples, calibrate: np.ndarray, score: np.ndarray,
                        classes: int) -> tuple[np.ndarray, np.ndarray]:
    """ART's label-only decision-boundary attack (Li & Zhang / Choquette-Choo et al.): the distance
    to the boundary found by HopSkipJump, its threshold calibrated on ``calibrate``; scores on ``score``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.inference.membership_inference import LabelOnlyDecisionBoundary
        from art.estimators.classification import PyTorchClassifier

    class Float32(nn.Module):  # HopSkipJump hands the model float64 candidates
        def __init__(self) -> None:
            super().__init__()
            self.model = model.cpu().eval()

        def forward(self, x):
            return self.model(x.float())

    classifier = PyTorchClassifier(model=Float32(), loss=nn.CrossEntropyLoss(),
                                   input_shape=samples.x_members.shape[1:], nb_classes=classes,
                                   clip_values=(float(samples.x_members.min()), float(samples.x_members.max())))
    hop = {"max_iter": 2, "max_eval": 200, "init_eval": 20, "verbose": False}
    attack = LabelOnlyDecisionBoundary(classifier)
    xm, ym, xn, yn = samples.x_members, samples.y_members, samples.x_non_members, samples.y_non_members
    attack.calibrate_distance_threshold(xm[calibrate], ym[calibrate], xn[calibrate], yn[calibrate], **hop)
    return tuple(attack.infer(x[score], y[score], probabilities=True, **hop)[:, -1].ravel()
                 for x, y in ((xm, ym), (xn, yn)))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--data-root", type=Path, default=None, help="folder with the real official files")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value, repeatable")
    parser.add_argument("--boundary-samples", type=int, default=100,
                        help="members (and non-members) the label-only boundary attack scores (0: skip it)")
    args = parser.parse_args()
    console = Console()
    overrides = [*args.set, *([f"data.root={args.data_root}"] if args.data_root else [])]
    # RMIA with 1, 2, 4 and 8 references, on the teacher too
    config = load_config(args.config, [*overrides, "audit.reference_models=8", "audit.teacher_reference_models=8"])
    bundle = prepare_data(config.data)
    folder = Path(tempfile.mkdtemp(prefix="kdsec-toolkits-"))
    with console.status("training the teacher, students and candidate"):
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
    boundary = min(args.boundary_samples, count // 2)
    BOUNDARY = f"ART label-only boundary ({boundary} + {boundary})"
    reference, reference_models = {}, {}
    with console.status(f"{config.audit.reference_models} reference models per architecture (cached)"):
        for group in ("teacher", "student"):
            paths, _ = audit_run.reference_checkpoints(config, bundle, group)
            reference_models[group] = [load_checkpoint(path)[0] for path in paths]
            reference[group] = signals(reference_models[group], samples)
    masks = reference_masks(config.audit.reference_models, len(samples.y_population), config.seed)
    kind = "real" if args.data_root or bundle.name == "digits" else "SYNTHETIC"

    def first(signals_k, k):
        return type(signals_k)(signals_k.members[:k], signals_k.non_members[:k], signals_k.population[:k])

    verdicts = {}
    for role, model in targets.items():
        group = "teacher" if role == "teacher" else "student"
        ref = reference[group]
        target = signals(model, samples)
        ours = {"ours LOSS": (-per_sample_loss(model, samples.x_members, samples.y_members),
                              -per_sample_loss(model, samples.x_non_members, samples.y_non_members))}
        for k in (1, 2, 4, 8):
            ours[f"ours RMIA, {k} ref."] = rmia_scores(target, first(ref, k), masks[:k], config.audit.rmia_a,
                                                       config.audit.rmia_gamma)
        ours["ours LiRA, 8 ref."] = lira_scores(target, ref)
        with console.status(f"ART attacks on {role}"):
            folds = [art_attacks(model, samples, train_half, test_half, config.seed),
                     art_attacks(model, samples, test_half, train_half, config.seed)]
            art = {}
            for name in folds[0]:
                member, non_member = np.empty(count), np.empty(count)
                for (scored_m, scored_n), half in zip((folds[0][name], folds[1][name]), (test_half, train_half)):
                    member[half], non_member[half] = scored_m, scored_n
                art[name] = (member, non_member)
            if boundary:
                np.random.seed(config.seed)  # HopSkipJump draws from numpy's global generator
                art[BOUNDARY] = label_only_boundary(model, samples, train_half[:boundary], test_half[:boundary],
                                                    bundle.num_classes)
        # The boundary attack scores a subset only: ours are scored on that subset too, to compare
        # on the same samples (TPR at 1 % FPR over 100 non-members hangs on one or two of them).
        subset = test_half[:boundary]
        on_subset = {f"{name} ({boundary} + {boundary})": (m[subset], n[subset]) for name, (m, n) in ours.items()
                     if boundary}
        results = {name: score_attack(m, n, config.audit.low_fpr, name, bootstrap=config.audit.bootstrap,
                                      seed=config.seed) for name, (m, n) in {**ours, **art, **on_subset}.items()}
        with console.status(f"Privacy Meter attacks on {role}"):
            results.update(privacy_meter_attacks(model, reference_models[group], samples, config.audit.low_fpr,
                                                 config.audit.bootstrap, config.seed))
        accuracy = float((predict_logits(model.cpu(), bundle.x_test).argmax(1) == bundle.y_test).mean())
        table = Table(title=f"{role} on {bundle.name} ({kind}; test accuracy {accuracy:.4f}): {count:,} members vs "
                            f"{count:,} non-members; ART cross-fitted on halves; 95 % bootstrap intervals")
        for column in ("attack", "AUC", f"TPR @ {config.audit.low_fpr:g} FPR", "TPR @ 0.001 FPR"):
            table.add_column(column, justify="left" if column == "attack" else "right")
        for name, r in results.items():
            table.add_row(name, f"{r.auc:.3f} [{r.auc_ci[0]:.3f}, {r.auc_ci[1]:.3f}]",
                          f"{r.tpr_at_low_fpr:.4f} [{r.tpr_at_low_fpr_ci[0]:.3f}, {r.tpr_at_low_fpr_ci[1]:.3f}]",
                          f"{r.tpr_at_0_1_fpr:.4f}")
        console.print(table)

        def strongest(prefix: str, subset: bool = False):
            return max((r for name, r in results.items()
                        if name.startswith(prefix) and name.endswith(f"({boundary} + {boundary})") == subset),
                       key=lambda r: (r.tpr_at_low_fpr, r.auc), default=None)

        def key(result):
            return (result.tpr_at_low_fpr, result.auc)

        best = [strongest(prefix) for prefix in ("ours", "ART", "Privacy Meter")]
        holds = all(key(best[0]) >= key(peer) for peer in best[1:])
        if BOUNDARY in results:  # against ours on the same samples
            holds &= key(strongest("ours", subset=True)) >= key(results[BOUNDARY])
            if key(results[BOUNDARY]) > key(best[1]):
                best[1] = results[BOUNDARY]
        verdicts[role] = (*best, holds)
    summary = Table(title=f"strongest attack per target (by TPR @ {config.audit.low_fpr:g} FPR, then AUC), {bundle.name}")
    for column in ("target", "ours", "ART", "Privacy Meter", "ours ≥ both"):
        summary.add_column(column)
    for role, (*best, holds) in verdicts.items():
        summary.add_row(role, *(f"{r.attack}: AUC {r.auc:.3f}, TPR {r.tpr_at_low_fpr:.4f}" for r in best),
                        "yes" if holds else "NO")
    console.print(summary)


if __name__ == "__main__":
    main()
