"""The explanation trust check: does a student decide for the teacher's reasons?

On a seeded sample of test images (a share of them misclassified by a student), each model's
attributions (every method in ``explain.methods``) are compared with the teacher's — Spearman
rank correlation and top-k % overlap per image over its pixels that are not black, averaged — and
checked for faithfulness with a deletion curve against a random order. Every mean has a
bootstrap 95% interval over images.
int8 variants have no input gradients: their maps are their float source's (``attributed_with``
says so) while their deletion curve runs the int8 model itself. The homomorphic path evaluates
the candidate's own weights, so it needs no pass of its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from kdsec import roles
from kdsec.audit.run import float_sources
from kdsec.config import ExplainConfig
from kdsec.data import DataBundle
from kdsec.explain.attribution import attribution_maps
from kdsec.explain.figure import FIGURE_ROLES, attribution_grid, figure_rows
from kdsec.explain.scores import (bootstrap_indices, curve_area, deletion_correct, deletion_fractions,
                                  importance_order, mean_interval, random_order, spearman, top_k_overlap)
from kdsec.train import predict_logits

TARGET = "the image's true class"
BASELINE = "black (0 on [0, 1] pixels)"
HE_NOTE = ("homomorphic inference evaluates the candidate's own weights (its argmax agreement is the he "
           "section's), so its explanations are the candidate's; it needs no separate pass")
FIGURE = Path("explain") / "attributions.png"

Interval = tuple[float, float]
_NO_INTERVAL = (float("nan"), float("nan"))


@dataclass(frozen=True)
class MethodScores:
    """One model's scores under one attribution method; agreement is None for the teacher itself."""

    method: str
    spearman: float | None
    spearman_ci: Interval
    top_k_overlap: float | None
    top_k_overlap_ci: Interval
    deletion_auc: float  # lower = the map finds the pixels the model needs
    deletion_auc_ci: Interval
    faithfulness_gap: float  # random-order deletion AUC − this method's: > 0 = better than random
    faithfulness_gap_ci: Interval
    deletion_curve: list[float] = field(repr=False)  # accuracy at each point of ``ExplainResult.fractions``


@dataclass(frozen=True)
class ModelExplanation:
    role: str
    attributed_with: str  # the role whose gradients made the maps: the model's own, or "<role> (float source)"
    sample_accuracy: float
    random_deletion_auc: float  # the same deletion, pixels in a seeded random order
    random_deletion_auc_ci: Interval
    random_deletion_curve: list[float] = field(repr=False)
    methods: dict[str, MethodScores] = field(default_factory=dict)


@dataclass(frozen=True)
class ExplainSample:
    """Which test images were explained (indices into the test split, ascending)."""

    size: int
    seed: int
    indices: list[int] = field(repr=False)
    misclassified: list[int] = field(repr=False)  # those a student (or the candidate) gets wrong
    figure_rows: list[int] = field(repr=False)  # the images drawn in the figure


@dataclass(frozen=True)
class ExplainResult:
    method: str  # the primary method: what the explanation gate reads
    methods: list[str]
    candidate_role: str  # the variant the candidate is (its scores are also under ``candidate``)
    sample: ExplainSample
    models: dict[str, ModelExplanation]
    fractions: list[float]  # share of pixels removed at each point of the deletion curves
    top_k_percent: float
    ig_steps: int
    bootstrap: int
    seconds: float
    figure: str | None = None
    target: str = TARGET
    baseline: str = BASELINE
    he_note: str = HE_NOTE

    @property
    def candidate_spearman(self) -> float:
        """The candidate's mean Spearman agreement with the teacher (primary method): the gate's metric."""
        return self.models[roles.CANDIDATE].methods[self.method].spearman

    def metrics(self) -> dict[str, float]:
        """``explain.<role>.<method>.<score>`` per model and method, ``explain.<role>.random_deletion_auc``
        and the stage's cost ``explain_seconds``."""
        rows: dict[str, float] = {}
        for role, model in self.models.items():
            rows[f"explain.{role}.random_deletion_auc"] = model.random_deletion_auc
            for method, scores in model.methods.items():
                for name in ("spearman", "top_k_overlap", "deletion_auc", "faithfulness_gap"):
                    if getattr(scores, name) is not None:
                        rows[f"explain.{role}.{method}.{name}"] = getattr(scores, name)
        return {**rows, "explain_seconds": self.seconds}

    def as_dict(self) -> dict:
        return asdict(self)


def explain_models(models: dict, bundle: DataBundle, config: ExplainConfig, candidate_role: str | None = None,
                   out_dir: Path | None = None) -> ExplainResult:
    """Explain every model of ``models`` (role → model; the teacher included) against the teacher.
    With ``candidate_role``, that model's scores are repeated as ``candidate``; with ``out_dir``,
    the figure (input, teacher, scratch, KD and candidate maps) is written to ``explain/attributions.png``."""
    started = time.perf_counter()
    baseline = black_baseline(bundle)
    predictions = {role: predict_logits(model, bundle.x_test).argmax(1) for role, model in models.items()}
    sample = explanation_sample(predictions, bundle.y_test, config)
    inputs, labels = bundle.x_test[sample.indices], bundle.y_test[sample.indices]
    # int8 variants have no input gradients: their float source's maps stand in for theirs.
    sources = {role: role for role in models} | {role: roles.variant_source(role) for role in float_sources(models)}
    maps = {(method, source): attribution_maps(method, models[source], inputs, labels, baseline, config.ig_steps)
            for method in config.methods for source in sorted(set(sources.values()))}

    informative = np.abs(inputs - baseline[None, :, None, None]).max(1) > 0  # (N, H, W): not the baseline
    fractions = deletion_fractions(informative[0].size, config.deletion_steps)
    draws = bootstrap_indices(len(labels), config.bootstrap, config.seed)
    shuffled = random_order(informative, config.seed)

    def deletion(model, order: np.ndarray) -> np.ndarray:
        return deletion_correct(model, inputs, labels, order, baseline, config.deletion_steps)

    explained = {}
    for role, model in models.items():
        random_correct = deletion(model, shuffled)
        random_areas = curve_area(random_correct, fractions)
        scores = {}
        for method in config.methods:
            own, teacher = maps[method, sources[role]], maps[method, roles.TEACHER]
            correct = deletion(model, importance_order(own, informative))
            areas = curve_area(correct, fractions)
            agreement = role != roles.TEACHER
            rho, rho_ci = _mean(spearman(own, teacher, informative) if agreement else None, draws)
            overlap, overlap_ci = _mean(top_k_overlap(own, teacher, informative, config.top_k_percent)
                                        if agreement else None, draws)
            deletion_auc, deletion_auc_ci = _mean(areas, draws)
            gap, gap_ci = _mean(random_areas - areas, draws)
            scores[method] = MethodScores(
                method=method, spearman=rho, spearman_ci=rho_ci, top_k_overlap=overlap, top_k_overlap_ci=overlap_ci,
                deletion_auc=deletion_auc, deletion_auc_ci=deletion_auc_ci, faithfulness_gap=gap,
                faithfulness_gap_ci=gap_ci, deletion_curve=correct.mean(0).tolist())
        explained[role] = ModelExplanation(
            role=role, attributed_with=role if sources[role] == role else f"{sources[role]} (float source)",
            sample_accuracy=float((predictions[role][sample.indices] == labels).mean()),
            random_deletion_auc=float(random_areas.mean()), random_deletion_auc_ci=mean_interval(random_areas, draws),
            random_deletion_curve=random_correct.mean(0).tolist(), methods=scores)
    if candidate_role is not None:
        explained[roles.CANDIDATE] = replace(explained[candidate_role], role=roles.CANDIDATE)
        predictions[roles.CANDIDATE], sources[roles.CANDIDATE] = predictions[candidate_role], sources[candidate_role]

    figure = None
    if out_dir is not None:
        shown = [role for role in FIGURE_ROLES if role in explained]
        rows = [sample.indices.index(index) for index in sample.figure_rows]
        figure = str(attribution_grid(
            inputs[rows], labels[rows], bundle, {role: maps[config.primary, sources[role]][rows] for role in shown},
            {role: predictions[role][sample.indices][rows] for role in shown},
            {role: explained[role].attributed_with for role in shown}, config.primary, out_dir / FIGURE))
    return ExplainResult(
        method=config.primary, methods=list(config.methods), candidate_role=candidate_role or "",
        sample=sample, models=explained, fractions=fractions.tolist(), top_k_percent=config.top_k_percent,
        ig_steps=config.ig_steps, bootstrap=config.bootstrap, seconds=time.perf_counter() - started,
        figure=figure)


def _mean(per_image: np.ndarray | None, draws: np.ndarray) -> tuple[float | None, Interval]:
    """The mean over images and its bootstrap interval; (None, no interval) for no scores."""
    if per_image is None:
        return None, _NO_INTERVAL
    return float(per_image.mean()), mean_interval(per_image, draws)


def black_baseline(bundle: DataBundle) -> np.ndarray:
    """Per channel, the model input of a black pixel (0 on [0, 1] pixels, normalized as the data is)."""
    channels = bundle.input_shape[0]
    if bundle.normalization is None:
        return np.zeros(channels, dtype=np.float32)
    mean, std = (np.asarray(values, dtype=np.float32) for values in bundle.normalization)
    return (-mean / std).astype(np.float32)


def explanation_sample(predictions: dict[str, np.ndarray], labels: np.ndarray, config: ExplainConfig) -> ExplainSample:
    """``explain.sample_size`` test images drawn with ``explain.seed``: up to ``misclassified_share``
    of them from the images some student gets wrong (where explanations are most telling), the
    rest from all the others."""
    rng = np.random.default_rng(config.seed)
    size = min(config.sample_size, len(labels))
    wrong = np.zeros(len(labels), dtype=bool)
    for role, predicted in predictions.items():
        if role != roles.TEACHER:
            wrong |= predicted != labels
    wrong_order, right_order = rng.permutation(np.flatnonzero(wrong)), rng.permutation(np.flatnonzero(~wrong))
    right = min(len(right_order), size - min(len(wrong_order), round(size * config.misclassified_share)))
    misclassified = np.sort(wrong_order[:size - right]).tolist()  # more of them only if too few are right
    indices = np.sort(np.r_[misclassified, right_order[:right]]).astype(int).tolist()
    return ExplainSample(size=size, seed=config.seed, indices=indices, misclassified=misclassified,
                         figure_rows=figure_rows(indices, misclassified))
