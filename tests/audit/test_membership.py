import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from kdsec.audit.membership import per_sample_loss, score_attack
from kdsec.audit.trust import calibration, per_class
from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model
from kdsec.train import fit, predict_logits


def _pairwise_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """The AUC by counting: P(member score > non-member score) + ½ P(tie), over all pairs."""
    difference = members[:, None] - non_members[None, :]
    return float((difference > 0).mean() + 0.5 * (difference == 0).mean())


def _thresholds(members: np.ndarray, non_members: np.ndarray):
    """(TPR, FPR) of every rule 'member if score >= t', from flagging nobody to everybody."""
    for threshold in np.r_[np.inf, np.unique(np.r_[members, non_members])]:
        yield (members >= threshold).mean(), (non_members >= threshold).mean()


def _tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    return max(tpr for tpr, false in _thresholds(members, non_members) if false <= fpr)


def _truth(members: int, non_members: int) -> np.ndarray:
    return np.r_[np.ones(members), np.zeros(non_members)]


def _loss_scores(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The loss attack's score (kdsec.audit.run.membership_attacks): the negative loss, higher = member."""
    return -per_sample_loss(model, x, y)


# --- the scoring, on scores whose answer is known ------------------------------------------------


def test_score_attack_on_a_hand_worked_example():
    members = np.array([0.9, 0.8, 0.7, 0.6, 0.35])
    non_members = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    result = score_attack(members, non_members, 0.1, "known")
    # 23 of the 25 (member, non-member) pairs are ordered right: only 0.35 < 0.5 and 0.35 < 0.4.
    assert result.auc == pytest.approx(23 / 25, abs=1e-12)
    assert result.auc == pytest.approx(roc_auc_score(_truth(5, 5), np.r_[members, non_members]), abs=1e-12)
    # No non-member scores above 0.5 and four members do: TPR 0.8 at FPR 0 (so at 10% and 0.1%).
    assert result.tpr_at_low_fpr == 0.8 and result.tpr_at_0_1_fpr == 0.8
    # Accepting 0.5 and 0.4 as false positives (FPR 0.4) reaches the last member at 0.35.
    assert score_attack(members, non_members, 0.4, "known").tpr_at_low_fpr == 1.0
    assert score_attack(members, non_members, 0.39, "known").tpr_at_low_fpr == 0.8
    # Best threshold 0.6: TPR 0.8, TNR 1.0.
    assert result.balanced_accuracy == pytest.approx(0.9, abs=1e-12)
    assert (result.members, result.non_members, result.low_fpr) == (5, 5, 0.1)
    assert (result.roc_fpr[0], result.roc_tpr[0], result.roc_fpr[-1], result.roc_tpr[-1]) == (0, 0, 1, 1)
    assert np.isnan(result.auc_ci).all() and result.per_class_auc == {}  # neither asked for


def test_ties_count_half():
    result = score_attack(np.array([1.0, 1.0]), np.array([1.0, 0.0]), 0.01, "known")
    assert result.auc == pytest.approx(0.75, abs=1e-12)  # pairs: tie, win, tie, win


def test_score_attack_agrees_with_sklearn_and_with_counting_on_random_scores():
    rng = np.random.default_rng(3)
    members, non_members = rng.normal(0.8, 1.0, 200), rng.normal(0.0, 1.0, 300)
    for low_fpr in (0.01, 0.05, 0.2):
        result = score_attack(members, non_members, low_fpr, "known")
        assert result.auc == pytest.approx(roc_auc_score(_truth(200, 300), np.r_[members, non_members]), abs=1e-12)
        assert result.auc == pytest.approx(_pairwise_auc(members, non_members), abs=1e-12)
        assert result.tpr_at_low_fpr == pytest.approx(_tpr_at_fpr(members, non_members, low_fpr), abs=1e-12)
    assert result.tpr_at_0_1_fpr == pytest.approx(_tpr_at_fpr(members, non_members, 0.001), abs=1e-12)
    best = max((tpr + 1 - fpr) / 2 for tpr, fpr in _thresholds(members, non_members))
    assert result.balanced_accuracy == pytest.approx(best, abs=1e-12)


def test_perfect_inverted_and_constant_scores():
    perfect = score_attack(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]), 0.01, "known")
    assert (perfect.auc, perfect.tpr_at_low_fpr, perfect.balanced_accuracy) == (1.0, 1.0, 1.0)
    inverted = score_attack(np.array([0.0, 1.0]), np.array([2.0, 3.0]), 0.01, "known")
    assert (inverted.auc, inverted.tpr_at_low_fpr, inverted.balanced_accuracy) == (0.0, 0.0, 0.5)
    constant = score_attack(np.full(50, 0.3), np.full(70, 0.3), 0.01, "known", bootstrap=20)
    assert (constant.auc, constant.tpr_at_low_fpr, constant.balanced_accuracy) == (0.5, 0.0, 0.5)
    assert constant.auc_ci == (0.5, 0.5)  # every resample is as uninformative


def test_per_class_auc_finds_leakage_the_overall_auc_hides():
    members, non_members = np.array([0.9, 0.8, 0.1, 0.2, 0.7]), np.array([0.3, 0.4, 0.5, 0.6])
    labels, non_member_labels = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 1, 1])
    result = score_attack(members, non_members, 0.01, "known", member_labels=labels,
                          non_member_labels=non_member_labels, class_names=["zero", "one", "two"])
    # Class zero's members outscore its non-members, class one's are outscored; no class-two non-member.
    assert result.per_class_auc == {"zero": 1.0, "one": 0.0}
    assert result.auc == pytest.approx(_pairwise_auc(members, non_members), abs=1e-12)
    assert result.auc == pytest.approx(12 / 20, abs=1e-12)  # 0.9, 0.8: 4 each; 0.7: 4; 0.1, 0.2: none


def test_bootstrap_interval_contains_the_estimate_and_narrows_as_n_grows():
    rng = np.random.default_rng(0)
    population_auc = norm.cdf(0.5 / np.sqrt(2))  # P(X > Y), X ~ N(0.5, 1), Y ~ N(0, 1): 0.638
    widths = []
    for n in (50, 200, 800):
        members, non_members = rng.normal(0.5, 1.0, n), rng.normal(0.0, 1.0, n)
        result = score_attack(members, non_members, 0.05, "known", bootstrap=200, seed=0)
        low, high = result.auc_ci
        assert low < result.auc < high, n
        assert low < population_auc < high, n
        assert result.tpr_at_low_fpr_ci[0] <= result.tpr_at_low_fpr_ci[1]
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 2  # the standard error falls as 1/sqrt(n): 16x the data, 1/4 the width
    again = score_attack(members, non_members, 0.05, "known", bootstrap=200, seed=0)
    assert (again.auc_ci, again.tpr_at_low_fpr_ci) == (result.auc_ci, result.tpr_at_low_fpr_ci)  # seeded


# --- the loss attack on models -------------------------------------------------------------------


def test_per_sample_loss_is_the_true_labels_cross_entropy(digits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]}))
    x, y = digits.x_test[:50], digits.y_test[:50]
    logits = predict_logits(model, x).astype(np.float64)
    expected = logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]  # -log softmax(logits)[y]
    np.testing.assert_allclose(per_sample_loss(model, x, y), expected, rtol=1e-5, atol=1e-6)


def test_attack_finds_a_memorizing_model(digits):
    """Random labels can only be fitted by memorizing: the classic memorization setup."""
    torch.manual_seed(0)
    members_x = digits.x_train[:60]
    members_y = np.random.default_rng(0).integers(0, 10, size=60)
    model = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 256}))
    fit(model, members_x, members_y, members_x, members_y,
        TrainConfig(epochs=150, patience=150, lr=3e-3, batch_size=16))
    member_scores = _loss_scores(model, members_x, members_y)
    non_member_scores = _loss_scores(model, digits.x_holdout[:60], digits.y_holdout[:60])
    result = score_attack(member_scores, non_member_scores, 0.01, "loss")
    assert result.members == result.non_members == 60
    assert result.auc == pytest.approx(_pairwise_auc(member_scores, non_member_scores), abs=1e-12)
    assert result.tpr_at_low_fpr == pytest.approx(_tpr_at_fpr(member_scores, non_member_scores, 0.01), abs=1e-12)
    assert result.auc >= 0.9
    assert result.tpr_at_low_fpr >= 0.3


def test_attack_finds_nothing_when_members_and_non_members_are_exchangeable(digits):
    torch.manual_seed(0)
    untrained = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]}))
    members_x, members_y = digits.x_train[:len(digits.y_holdout)], digits.y_train[:len(digits.y_holdout)]
    member_scores = _loss_scores(untrained, members_x, members_y)
    non_member_scores = _loss_scores(untrained, digits.x_holdout, digits.y_holdout)
    result = score_attack(member_scores, non_member_scores, 0.01, "loss")
    assert result.auc == pytest.approx(_pairwise_auc(member_scores, non_member_scores), abs=1e-12)
    assert result.auc == pytest.approx(0.5, abs=0.05)
    assert result.tpr_at_low_fpr < 0.1


def test_an_overfit_model_leaks_more_than_a_well_generalized_one(digits):
    """The same small MLP: fitted to a handful of samples until it memorizes them, and trained on
    the whole training split with early stopping. The loss attack separates the first's members."""
    spec = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [128]})
    torch.manual_seed(0)
    overfit = build_model(spec)
    few_x, few_y = digits.x_train[:30], digits.y_train[:30]
    fit(overfit, few_x, few_y, few_x, few_y, TrainConfig(epochs=60, patience=60, lr=1e-2, batch_size=30))
    torch.manual_seed(0)
    general = build_model(spec)
    fit(general, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
        TrainConfig(epochs=10, patience=3, lr=3e-3, batch_size=64))
    leaky = score_attack(_loss_scores(overfit, few_x, few_y),
                         _loss_scores(overfit, digits.x_holdout, digits.y_holdout), 0.01, "loss")
    tight = score_attack(_loss_scores(general, digits.x_train, digits.y_train),
                         _loss_scores(general, digits.x_holdout, digits.y_holdout), 0.01, "loss")
    assert np.exp(_loss_scores(overfit, few_x, few_y)).min() > 0.99  # memorized: every member's p(y) > 0.99
    assert leaky.auc >= 0.8
    assert tight.auc == pytest.approx(0.5, abs=0.06)
    assert leaky.auc - tight.auc >= 0.25


# --- trust -------------------------------------------------------------------------------------


def test_calibration_of_a_perfect_and_an_overconfident_model():
    labels = np.arange(10).repeat(20)
    confident_right = np.eye(10)[labels] * 50
    assert calibration(confident_right, labels).ece == pytest.approx(0.0, abs=1e-6)
    confident_wrong = np.eye(10)[(labels + 1) % 10] * 50
    assert calibration(confident_wrong, labels).ece == pytest.approx(1.0, abs=1e-6)


def test_per_class_names_the_worst_class(digits):
    predictions = digits.y_test.copy()
    predictions[digits.y_test == 3] = 5
    result = per_class(predictions, digits.y_test, digits.class_names)
    assert result.worst_class == "3" and result.accuracy["3"] == 0.0
    assert result.worst_class_gap == pytest.approx((predictions == digits.y_test).mean())


def test_predict_logits_are_the_models_outputs_in_order(digits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [8]}))
    logits = predict_logits(model, digits.x_test, batch_size=7)  # many batches, the last one short
    assert logits.shape == (len(digits.x_test), 10) and logits.dtype == np.float32
    with torch.no_grad():
        expected = model.eval()(torch.as_tensor(digits.x_test)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_the_fast_roc_is_sklearns_to_the_last_bit_and_so_is_the_bootstrap():
    """``membership.roc``/``auc`` replace sklearn's validated calls in the bootstrap: same curve,
    same AUC and TPR (ties and collinear runs included), and the bootstrap interval is the one the
    sklearn loop gave with the same seed."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from kdsec.audit.membership import auc, roc, score_attack

    rng = np.random.default_rng(3)
    for scores in (rng.normal(size=300), np.round(rng.normal(size=300), 1), np.repeat(np.arange(10.0), 30)):
        truth = (rng.random(300) < 0.5).astype(float)
        fpr, tpr = roc(truth, scores)
        sk_fpr, sk_tpr, _ = roc_curve(truth, scores)
        assert np.array_equal(fpr, sk_fpr) and np.array_equal(tpr, sk_tpr)
        assert auc(fpr, tpr) == pytest.approx(roc_auc_score(truth, scores), abs=1e-15)

    members, non_members = rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)
    result = score_attack(members, non_members, 0.05, "loss", bootstrap=50, seed=7)
    draws, aucs, tprs = np.random.default_rng(7), [], []
    truth = np.r_[np.ones(200), np.zeros(200)]
    for _ in range(50):
        scores = np.r_[draws.choice(members, 200), draws.choice(non_members, 200)]
        sk_fpr, sk_tpr, _ = roc_curve(truth, scores)
        aucs.append(roc_auc_score(truth, scores))
        tprs.append(sk_tpr[sk_fpr <= 0.05].max())
    assert result.auc_ci == pytest.approx((np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)), abs=1e-12)
    assert result.tpr_at_low_fpr_ci == pytest.approx((np.percentile(tprs, 2.5), np.percentile(tprs, 97.5)))
