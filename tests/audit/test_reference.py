import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from scipy.stats import norm

from kdsec.audit.membership import score_attack
from kdsec.audit.reference import (AuditSamples, Signals, audit_samples, lira_scores, reference_masks, rmia_scores,
                                   signals, train_references, true_label_probability)
from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model, load_checkpoint
from kdsec.train import fit, predict_logits

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]})
TRAIN = TrainConfig(epochs=60, patience=60, lr=3e-3, batch_size=32)


@pytest.fixture(scope="module")
def references(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("references")
    x_population = np.concatenate([digits.x_val, digits.x_test])
    y_population = np.concatenate([digits.y_val, digits.y_test])
    masks = reference_masks(6, len(y_population), seed=0)
    paths = train_references(SPEC, TRAIN, x_population, y_population, masks, list(range(len(masks))),
                             [folder / f"ref{seed}.safetensors" for seed in range(len(masks))])
    models = [load_checkpoint(path)[0] for path in paths]
    return x_population, y_population, masks, models


def _attack(target, references, x_members, y_members, x_non, y_non):
    x_population, y_population, masks, models = references
    samples = AuditSamples(x_members, y_members, x_non, y_non, x_population, y_population)
    target_signals, reference_signals = signals(target, samples), signals(models, samples)
    return (score_attack(*rmia_scores(target_signals, reference_signals, masks), 0.01, "rmia", bootstrap=50),
            score_attack(*lira_scores(target_signals, reference_signals), 0.01, "lira"))


def test_reference_masks_are_half_each_and_deterministic():
    masks = reference_masks(8, 101, seed=3)
    assert (masks.sum(axis=1) == 50).all()
    assert (masks == reference_masks(8, 101, seed=3)).all()
    assert not (masks[0] == masks[1]).all()
    assert (reference_masks(4, 101, seed=3) == masks[:4]).all()  # row k does not depend on K


def test_audit_samples_balance_members_with_the_holdout(digits):
    samples = audit_samples(digits, seed=0)
    count = len(digits.y_holdout)  # the holdout is the smaller side: every holdout sample, as many members
    np.testing.assert_array_equal(samples.x_non_members, digits.x_holdout)
    np.testing.assert_array_equal(samples.y_non_members, digits.y_holdout)
    assert len(samples.y_members) == count
    training_rows = {row.tobytes(): label for row, label in zip(digits.x_train, digits.y_train)}
    members = [row.tobytes() for row in samples.x_members]
    assert len(set(members)) == count and all(row in training_rows for row in members)  # distinct training rows
    assert [training_rows[row] for row in members] == samples.y_members.tolist()  # with their own labels
    np.testing.assert_array_equal(samples.x_population, np.concatenate([digits.x_val, digits.x_test]))
    np.testing.assert_array_equal(samples.y_population, np.concatenate([digits.y_val, digits.y_test]))
    np.testing.assert_array_equal(audit_samples(digits, seed=0).x_members, samples.x_members)
    assert not np.array_equal(audit_samples(digits, seed=1).x_members, samples.x_members)


def test_signals_are_each_models_probability_of_the_true_label(digits, references):
    x_population, y_population, _, models = references
    samples = AuditSamples(digits.x_train[:20], digits.y_train[:20], digits.x_holdout[:15], digits.y_holdout[:15],
                           x_population, y_population)
    by_hand = softmax(predict_logits(models[0], samples.x_members).astype(np.float64), axis=1)
    np.testing.assert_allclose(true_label_probability(models[0], samples.x_members, samples.y_members),
                               by_hand[np.arange(20), samples.y_members], rtol=1e-12)
    stacked = signals(models[:2], samples)
    assert stacked.members.shape == (2, 20) and stacked.non_members.shape == (2, 15)
    assert stacked.population.shape == (2, len(y_population))
    for index, model in enumerate(models[:2]):
        one = signals(model, samples)
        for part in ("members", "non_members", "population"):
            np.testing.assert_array_equal(getattr(stacked, part)[index], getattr(one, part))


def test_lira_scores_are_z_scores_of_the_logit_confidence():
    # Members: the reference models' logit-scaled confidences are -1, 0, 1 (mean 0, std sqrt(2/3)),
    # the target's is 2. Non-member: the references agree on 1 (std floored at 1e-3), the target says 0.
    target = Signals(members=expit(np.array([2.0])), non_members=expit(np.array([0.0])), population=np.array([0.5]))
    reference = Signals(members=expit(np.array([[-1.0], [0.0], [1.0]])), non_members=expit(np.ones((3, 1))),
                        population=np.full((3, 1), 0.5))
    members, non_members = lira_scores(target, reference)
    np.testing.assert_allclose(members, [2.0 / np.sqrt(2 / 3)], rtol=1e-9)
    np.testing.assert_allclose(non_members, [-1.0 / 1e-3], rtol=1e-6)


def test_rmia_scores_count_the_population_samples_x_dominates():
    """With a = 0.3 the OUT-only prior of x is ((1 + a) · mean_out + (1 − a)) / 2: 1 for a mean of
    1, 0.675 for 0.5, 0.35 for 0. Each population sample z is scored only by the reference models
    it is OUT for (here they all say 1, so p_ref(z) = 1 and ratio_z = p_target(z))."""
    population_in = np.array([[True, False, True, False], [False, True, False, True]])
    target = Signals(members=np.array([0.9, 0.54]), non_members=np.array([0.105, 0.5]),
                     population=np.array([0.2, 0.4, 0.6, 0.85]))
    reference = Signals(members=np.array([[1.0, 0.5], [1.0, 0.5]]), non_members=np.array([[0.0, 1.0], [0.0, 1.0]]),
                        population=np.where(population_in, 0.0, 1.0))  # IN answers are never read
    # ratio_x: 0.9 / 1 = 0.9, 0.54 / 0.675 = 0.8 (members); 0.105 / 0.35 = 0.3, 0.5 / 1 = 0.5 (non-members)
    members, non_members = rmia_scores(target, reference, population_in, a=0.3, gamma=1.0)
    np.testing.assert_array_equal(members, [1.0, 0.75])  # 0.9 beats all four ratio_z; 0.8 all but 0.85
    np.testing.assert_array_equal(non_members, [0.25, 0.5])  # 0.3 beats 0.2; 0.5 beats 0.2 and 0.4
    # gamma: x must beat z by a factor over 1.8: 0.9 and 0.8 both only beat 0.2 and 0.4.
    members, _ = rmia_scores(target, reference, population_in, a=0.3, gamma=1.8)
    np.testing.assert_array_equal(members, [0.5, 0.5])


def test_reference_attacks_find_a_memorizing_model(digits, references):
    torch.manual_seed(0)
    members_x = digits.x_train[:60]
    members_y = np.random.default_rng(0).integers(0, 10, size=60)  # random labels: only memorization fits them
    target = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 256}))
    fit(target, members_x, members_y, members_x, members_y, TrainConfig(epochs=150, patience=150, lr=3e-3,
                                                                          batch_size=16))
    for result in _attack(target, references, members_x, members_y, digits.x_holdout[:60], digits.y_holdout[:60]):
        assert result.auc >= 0.9, result.attack
        assert result.tpr_at_low_fpr >= 0.3, result.attack


def test_reference_attacks_find_nothing_when_members_and_non_members_are_exchangeable(digits, references):
    """Neither 'members' nor non-members were trained on: the target learned from other data."""
    torch.manual_seed(1)
    target = build_model(SPEC)
    x_population, y_population, masks, _ = references
    fit(target, x_population[masks[0]], y_population[masks[0]], x_population[~masks[0]], y_population[~masks[0]],
        TRAIN)
    for result in _attack(target, references, digits.x_train[:360], digits.y_train[:360], digits.x_holdout,
                          digits.y_holdout):
        assert result.auc == pytest.approx(0.5, abs=0.05), result.attack
        assert result.tpr_at_low_fpr < 0.1, result.attack


def test_bootstrap_intervals_bracket_the_estimate_and_the_population_value():
    """Members' scores ~ N(0.5, 1), non-members' ~ N(0, 1): AUC Φ(0.5/√2), TPR at 5% FPR
    1 − Φ(z_0.95 − 0.5), best balanced accuracy Φ(0.25) (threshold 0.25)."""
    rng = np.random.default_rng(0)
    result = score_attack(rng.normal(0.5, 1, 300), rng.normal(0, 1, 300), 0.05, "known", bootstrap=200)
    assert result.auc_ci[0] < result.auc < result.auc_ci[1]
    assert result.auc_ci[0] < norm.cdf(0.5 / np.sqrt(2)) < result.auc_ci[1]
    assert result.auc_ci[1] - result.auc_ci[0] < 0.2
    assert result.tpr_at_low_fpr_ci[0] <= result.tpr_at_low_fpr <= result.tpr_at_low_fpr_ci[1]
    assert result.tpr_at_low_fpr_ci[0] < 1 - norm.cdf(norm.ppf(0.95) - 0.5) < result.tpr_at_low_fpr_ci[1]
    assert result.balanced_accuracy == pytest.approx(norm.cdf(0.25), abs=0.02)


def test_rmia_scores_match_the_pairwise_definition_without_building_the_matrix():
    """The binary-search form equals the paper's pairwise count (ratio_x / ratio_z > gamma) on random
    signals, for several gammas."""
    rng = np.random.default_rng(3)
    target = Signals(rng.uniform(0.01, 1, 300), rng.uniform(0.01, 1, 300), rng.uniform(0.01, 1, 500))
    reference = Signals(rng.uniform(0.01, 1, (4, 300)), rng.uniform(0.01, 1, (4, 300)), rng.uniform(0.01, 1, (4, 500)))
    population_in = rng.random((4, 500)) < 0.5
    for gamma in (0.5, 1.0, 2.0):
        members, non_members = rmia_scores(target, reference, population_in, gamma=gamma)
        prior = lambda values, out=None: 0.5 * (1.3 * (values.mean(0) if out is None else  # noqa: E731
                                                      (values * out).sum(0) / np.maximum(out.sum(0), 1)) + 0.7)
        ratio_z = target.population / prior(reference.population, ~population_in)
        for mine, target_p, reference_p in ((members, target.members, reference.members),
                                            (non_members, target.non_members, reference.non_members)):
            pairwise = ((target_p / prior(reference_p))[:, None] / ratio_z[None, :] > gamma).mean(axis=1)
            np.testing.assert_allclose(mine, pairwise)


def test_rmia_scores_of_zero_probabilities_match_the_pairwise_count():
    """Ties and zeros: with a = 1 a sample whose reference models all say 0 has prior 0, so its
    ratio is 0 / 0 (NaN) or p / 0 (inf); the pairwise count scores NaN as dominating nothing."""
    target = Signals(np.array([0.0, 0.5, 0.2]), np.array([0.0, 0.2]), np.array([0.2, 0.2, 0.0, 0.7]))
    reference = Signals(np.array([[0.0, 0.0, 0.4]]), np.array([[0.5, 0.4]]), np.array([[0.4, 0.4, 0.4, 0.4]]))
    population_in = np.zeros((1, 4), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        members, non_members = rmia_scores(target, reference, population_in, a=1.0)
        ratio_z = target.population / reference.population[0]
        for mine, target_p, reference_p in ((members, target.members, reference.members[0]),
                                            (non_members, target.non_members, reference.non_members[0])):
            pairwise = ((target_p / reference_p)[:, None] / ratio_z[None, :] > 1.0).mean(axis=1)
            np.testing.assert_array_equal(mine, pairwise)
    np.testing.assert_array_equal(members, [0.0, 1.0, 0.25])  # NaN; inf beats all; 0.5 beats only 0 (ties do not count)
