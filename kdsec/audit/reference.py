"""Reference-model membership attacks: RMIA (Zarifzadeh et al. 2024) and LiRA (Carlini et al.
2022), both in their offline form.

K reference models of the target's architecture are trained on random halves of *population*
data (validation + test splits), disjoint from the target's training set and from the audited
samples. Every audited sample is therefore OUT for every reference model, which is what the
offline attacks assume; population samples are each IN for about half of them.

- RMIA: the likelihood ratio of x, p_target(y|x) / p_ref(y|x), is compared with that of every
  population sample z; the score is the fraction of z that x dominates by more than ``gamma``.
  p_ref comes from the OUT reference models, corrected for the missing IN half with the
  paper's offline interpolation ``((1 + a) · mean_out + (1 − a)) / 2``.
- LiRA: a Gaussian is fitted per sample to the reference models' logit-scaled confidence
  log(p / (1 − p)); the score is how far the target's confidence lies above it (z-score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax
from torch import nn

from kdsec.config import TrainConfig
from kdsec.data import DataBundle
from kdsec.models import ModelSpec, build_model, save_checkpoint
from kdsec.train import INIT_LOCK, can_fit_together, fit, fit_ensemble, predict_logits, seed_everything


@dataclass(frozen=True)
class AuditSamples:
    """Who is audited: members (a training subset as large as the holdout), non-members (the
    holdout), and the population reference models learn from."""

    x_members: np.ndarray
    y_members: np.ndarray
    x_non_members: np.ndarray
    y_non_members: np.ndarray
    x_population: np.ndarray
    y_population: np.ndarray


def audit_samples(bundle: DataBundle, seed: int, member_split: str = "train") -> AuditSamples:
    """Members from ``member_split`` (the audited model's training data: ``train``, or
    ``transfer`` for students distilled on the transfer set), non-members from the holdout."""
    x_split, y_split = bundle.split(member_split)
    count = min(len(y_split), len(bundle.y_holdout))
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(len(y_split), size=count, replace=False))
    non_members = np.sort(rng.choice(len(bundle.y_holdout), size=count, replace=False))
    return AuditSamples(x_split[members], y_split[members],
                        bundle.x_holdout[non_members], bundle.y_holdout[non_members],
                        np.concatenate([bundle.x_val, bundle.x_test]), np.concatenate([bundle.y_val, bundle.y_test]))


def reference_masks(count: int, size: int, seed: int) -> np.ndarray:
    """K × size: which population samples each reference model trains on (exactly half each)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size), dtype=bool)
    for row in masks:
        row[rng.choice(size, size // 2, replace=False)] = True
    return masks


def train_references(spec: ModelSpec, train: TrainConfig, x_population: np.ndarray, y_population: np.ndarray,
                     masks: np.ndarray, seeds: list[int], checkpoints: list[Path]) -> list[Path]:
    """Reference models, one per row of ``masks``: each on the IN half of the population, early
    stopping on its OUT half. Trained all at once (``fit_ensemble``: one vectorized step for all,
    each model's own data, order, optimizer state and stopping) where the architecture allows,
    else one after the other. Initialization (the only use of the global RNG) is locked, so
    trainings in parallel threads start each model exactly as it would alone."""
    with INIT_LOCK:
        models = []
        for seed in seeds:
            seed_everything(seed)
            models.append(build_model(spec))
    if can_fit_together(models[0], train):  # even one: a model is trained the same whichever share it is in
        fit_ensemble(models, np.stack([x_population[mask] for mask in masks]),
                     np.stack([y_population[mask] for mask in masks]),
                     np.stack([x_population[~mask] for mask in masks]),
                     np.stack([y_population[~mask] for mask in masks]), train, list(seeds), label="reference")
    else:
        for model, mask, seed in zip(models, masks, seeds, strict=True):
            fit(model, x_population[mask], y_population[mask], x_population[~mask], y_population[~mask], train,
                seed=seed, label="reference")
    return [save_checkpoint(model, spec, checkpoint) for model, checkpoint in zip(models, checkpoints, strict=True)]


def train_reference_share(population: tuple[np.ndarray, np.ndarray], spec: ModelSpec, train: TrainConfig,
                          masks: np.ndarray, seeds: list[int]) -> list[bytes]:
    """On a Dask worker: ``train_references`` on ``population`` (x, y; scattered once to each
    worker), one torch thread, as a local share on 2 cores trains; the checkpoints come back as
    safetensors bytes (nothing is kept on the worker)."""
    import tempfile

    from kdsec.device import torch_threads

    x_population, y_population = population
    with tempfile.TemporaryDirectory(prefix="kdsec-reference-") as folder, torch_threads(1):
        paths = [Path(folder) / f"{seed}.safetensors" for seed in seeds]
        train_references(spec, train, x_population, y_population, masks, list(seeds), paths)
        return [path.read_bytes() for path in paths]


def true_label_probability(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probabilities = softmax(predict_logits(model.cpu(), inputs).astype(np.float64), axis=1)
    return probabilities[np.arange(len(labels)), labels]


@dataclass(frozen=True)
class Signals:
    """p(true label | x) of one model (1-D) or of K reference models (K × n), on the audit samples."""

    members: np.ndarray
    non_members: np.ndarray
    population: np.ndarray


def signals(models: list[nn.Module] | nn.Module, samples: AuditSamples) -> Signals:
    def of(model):
        return (true_label_probability(model, samples.x_members, samples.y_members),
                true_label_probability(model, samples.x_non_members, samples.y_non_members),
                true_label_probability(model, samples.x_population, samples.y_population))

    if isinstance(models, nn.Module):
        return Signals(*of(models))
    return Signals(*(np.stack(parts) for parts in zip(*(of(model) for model in models))))


def _out_mean(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        return values.mean(axis=0)
    return (values * out).sum(axis=0) / np.maximum(out.sum(axis=0), 1)


def rmia_scores(target: Signals, reference: Signals, population_in: np.ndarray, a: float = 0.3,
                gamma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """RMIA scores (higher = member) of the members and non-members."""
    def prior(values, out=None):
        return 0.5 * ((1 + a) * _out_mean(values, out) + (1 - a))

    ratio_z = target.population / prior(reference.population, ~population_in)

    # The fraction of z with ratio_x / ratio_z > gamma, i.e. ratio_z < ratio_x / gamma: a binary
    # search in the sorted population ratios (O(n log n); the pairwise matrix was 14,000 × 21,000
    # float64 = 2.3 GiB on MNIST-sized data).
    sorted_z = np.sort(ratio_z)

    def score(target_p, reference_p):
        ratio_x = target_p / prior(reference_p)
        # A NaN ratio (0 / 0 with rmia_a = 1) dominates nothing, as in the pairwise comparison.
        scores = np.searchsorted(sorted_z, ratio_x / gamma, side="left") / len(sorted_z)
        return np.where(np.isnan(ratio_x), 0.0, scores)

    return score(target.members, reference.members), score(target.non_members, reference.non_members)


def lira_scores(target: Signals, reference: Signals) -> tuple[np.ndarray, np.ndarray]:
    """Offline LiRA z-scores (higher = member) of the members and non-members."""
    def logit(p):
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return np.log(p) - np.log1p(-p)

    def score(target_p, reference_p):
        scaled = logit(reference_p)
        spread = np.maximum(scaled.std(axis=0), 1e-3)
        return (logit(target_p) - scaled.mean(axis=0)) / spread

    return score(target.members, reference.members), score(target.non_members, reference.non_members)
