"""Per-image scores of attribution maps, and their bootstrap intervals.

Agreement of two maps of the same image: Spearman rank correlation over its pixels, and the share
of the top-k % pixels they have in common — both over the pixels that differ from the baseline
(black). A pixel equal to the baseline gets exactly zero Integrated-Gradients attribution from
every model, so counting those ties would make any two models agree: on digits, whose background
is black, a randomly initialised student scored a Spearman of 0.90 against the teacher that way.

Faithfulness of a map: the deletion curve (Samek et al. 2017; Petsiuk et al. 2018) — pixels
removed (set to the baseline) in the map's order, most important first, and whether the model
still classifies the image; a faithful map makes the model fail sooner than a random order does.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from kdsec.train import predict_logits


def spearman(maps: np.ndarray, reference: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Per image (row), the Spearman correlation of two maps over the pixels in ``where`` (ties get
    average ranks); 0 where either map is constant there, which carries no ranking to agree with."""
    keep = where.reshape(len(where), -1)
    a, b = (_ranks_within(values.reshape(len(values), -1), keep) for values in (maps, reference))
    count = np.maximum(keep.sum(1, keepdims=True), 1)
    a = np.where(keep, a - (a * keep).sum(1, keepdims=True) / count, 0.0)
    b = np.where(keep, b - (b * keep).sum(1, keepdims=True) / count, 0.0)
    scale = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.divide((a * b).sum(1), scale, out=np.zeros(len(a)), where=scale > 0)


def _ranks_within(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Average ranks of each row's kept values; the others tie below them all, which shifts every
    kept rank of a row by the same amount (the correlation does not see it)."""
    return rankdata(np.where(keep, values, -np.inf), axis=1)


def top_k_overlap(maps: np.ndarray, reference: np.ndarray, where: np.ndarray, top_k_percent: float) -> np.ndarray:
    """Per image, the share of the reference's top-k % pixels (of those in ``where``, at least one)
    that are also among the map's."""
    keep = where.reshape(len(where), -1)
    k = np.maximum(1, np.round(keep.sum(1) * top_k_percent / 100)).astype(int)[:, None]
    chosen = [_top(values.reshape(len(values), -1), keep, k) for values in (maps, reference)]
    return (chosen[0] & chosen[1]).sum(1) / k[:, 0]


def _top(values: np.ndarray, keep: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each row's k highest kept values (ties by position: deterministic), as a mask."""
    order = np.argsort(-np.where(keep, values, -np.inf), axis=1, kind="stable")
    position = np.empty_like(order)
    position[np.arange(len(order))[:, None], order] = np.arange(order.shape[1])
    return (position < k) & keep


def importance_order(maps: np.ndarray, informative: np.ndarray) -> np.ndarray:
    """Pixel indices of each map, most attributed first among the image's informative (not black)
    pixels, then the black ones (deleting those changes nothing); ties by position: deterministic."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    scale = np.abs(flat).max() + 1.0
    return np.argsort(-(flat + scale * informative.reshape(len(maps), -1)), axis=1, kind="stable")


def random_order(informative: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random order of each image's informative pixels, then its black ones: the baseline a
    faithful map must beat. (Drawn over all pixels, half of a digit's "deletions" would black out
    pixels that are black already, and any ink-first order would beat it.)"""
    rng = np.random.default_rng(seed)
    flat = informative.reshape(len(informative), -1)
    return np.argsort(rng.random(flat.shape) - flat, axis=1)


def deletion_fractions(pixels: int, steps: int) -> np.ndarray:
    """The share of pixels removed at each point of the curve: 0, then ``steps`` equal steps to 1."""
    return np.round(np.linspace(0, pixels, steps + 1)) / pixels


def deletion_correct(model, inputs: np.ndarray, labels: np.ndarray, order: np.ndarray, baseline: np.ndarray,
                     steps: int) -> np.ndarray:
    """(images, steps + 1): whether ``model`` still classifies each image correctly after its first
    pixels in ``order`` are set to ``baseline`` (one value per channel; every channel of a pixel)."""
    count, channels = inputs.shape[:2]
    pixels = order.shape[1]
    rank = np.empty_like(order)
    rank[np.arange(count)[:, None], order] = np.arange(pixels)  # rank[i, p]: when pixel p goes
    flat = inputs.reshape(count, channels, pixels)
    fill = np.asarray(baseline, dtype=inputs.dtype).reshape(1, channels, 1)
    removed = np.round(deletion_fractions(pixels, steps) * pixels)
    batch = np.stack([np.where((rank < n)[:, None, :], fill, flat) for n in removed])  # (steps+1, N, C, P)
    logits = predict_logits(model, batch.reshape(-1, *inputs.shape[1:]).astype(np.float32))
    return (logits.argmax(1).reshape(len(removed), count) == labels[None, :]).T


def curve_area(correct: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Per image, the area under its deletion curve (accuracy against the share removed)."""
    return np.trapezoid(correct.astype(np.float64), fractions, axis=1)


def bootstrap_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, count) image indices drawn with replacement; every score of a run is resampled
    with the same draws, so intervals of differences between models are paired."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def mean_interval(per_image: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of ``per_image`` (NaN without resamples)."""
    if not len(draws):
        return float("nan"), float("nan")
    means = per_image[draws].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
