"""An empirical check of a DP claim in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries — images the training split does not hold, each given a wrong label — are each added
to the training set with probability ½ (coins drawn from the run's seed: the auditor must know
them; the audit copies that see the canaries never ship). After training, each canary's score
is the model's log-probability of its wrong label (black-box: outputs only). The auditor guesses
"in" for the k₊ highest scores and "out" for the k₋ lowest and abstains on the rest; v of its
r = k₊ + k₋ guesses are right. A mechanism that is (ε, δ)-DP makes v at most as likely to be
large as Binomial(r, e^ε/(1+e^ε)) (plus a δ term), so the largest ε whose p-value for v is below
1 − confidence is a lower bound on the ε the training really has: if it exceeds the
accountant's ε, the guarantee is refuted.

The guess counts are fixed before the scores are seen (k₊ = k₋ = m/4 by default), so the bound is
one test, with no search over thresholds to correct for. The canaries only ever enter the audit
copies trained here; the models a run ships never see them.

The bound has a ceiling: even every guess right gives at most ε̂ ≈ ln(r/3) (r = 128 guesses: 3.74).
Where that ceiling does not exceed the accountant's ε, no outcome could refute the claim: the
audit says "inconclusive" and the dp_audit gate is skipped, not passed (refuting ε = 8 takes
~18,000 canaries in one run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F

from kdsec.train import predict_logits


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v of r guesses right] under (ε, δ)-DP (their Theorem 5.2; the paper's reference code)."""
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    alpha = cumulative = 0.0
    for i in range(1, v + 1):
        cumulative += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, cumulative / i)
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε whose p-value for v right of r guesses is below 1 − ``confidence`` (0 if none)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    level = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low


@dataclass(frozen=True)
class Canaries:
    inputs: np.ndarray
    labels: np.ndarray  # each a wrong label
    included: np.ndarray  # bool: added to the training set (the coin)


def make_canaries(inputs: np.ndarray, labels: np.ndarray, count: int, classes: int, seed: int) -> Canaries:
    """``count`` of ``inputs`` (never training rows) with a random wrong label each, and a fair coin each."""
    rng = np.random.default_rng([seed, 0xCA4A])
    chosen = rng.choice(len(labels), size=min(count, len(labels)), replace=False)
    wrong = (labels[chosen] + rng.integers(1, classes, size=len(chosen))) % classes
    return Canaries(inputs[chosen], wrong.astype(labels.dtype), rng.random(len(chosen)) < 0.5)


def scores(model, canaries: Canaries) -> np.ndarray:
    """Black-box: the model's log-probability of each canary's (wrong) label."""
    logits = torch.as_tensor(predict_logits(model, canaries.inputs))
    return F.log_softmax(logits, 1)[torch.arange(len(canaries.labels)), torch.as_tensor(canaries.labels)].numpy()


@dataclass(frozen=True)
class DPAudit:
    model: str
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower: float  # at ``confidence``
    confidence: float
    delta: float
    accountant_epsilon: float | None  # None: the model was trained without DP
    seconds: float

    @property
    def refuted(self) -> bool:
        """The lower bound exceeds the accountant's ε: the claimed guarantee does not hold."""
        return self.accountant_epsilon is not None and self.epsilon_lower > self.accountant_epsilon

    @property
    def ceiling(self) -> float:
        """The largest ε̂ these canaries could give (every guess right)."""
        return epsilon_lower_bound(self.canaries, self.guesses, self.guesses, self.delta, self.confidence)

    @property
    def conclusive(self) -> bool:
        """Whether some outcome could refute the accountant's ε (the ceiling is above it)."""
        return self.accountant_epsilon is not None and self.ceiling > self.accountant_epsilon

    @property
    def claim(self) -> str:
        if self.accountant_epsilon is None:
            return "no DP claim"
        return "REFUTED" if self.refuted else ("holds" if self.conclusive else "inconclusive")

    def as_dict(self) -> dict:
        return {**self.__dict__, "refuted": self.refuted, "ceiling": self.ceiling, "claim": self.claim}


def audit_one_run(name: str, train: Callable[[np.ndarray, np.ndarray], tuple[float | None, object]], x_train: np.ndarray,
                  y_train: np.ndarray, canaries: Canaries, delta: float, guess_fraction: float = 0.5,
                  confidence: float = 0.95) -> tuple[DPAudit, object]:
    """Train once (``train(x, y)`` returns the accountant's ε — None without DP — and the model)
    on the training rows plus the included canaries,
    then score every canary and bound ε. ``guess_fraction`` of the canaries are guessed, half
    "in" (highest scores) and half "out" (lowest)."""
    import time

    started = time.perf_counter()
    x = np.concatenate([x_train, canaries.inputs[canaries.included]])
    y = np.concatenate([y_train, canaries.labels[canaries.included]])
    epsilon, model = train(x, y)
    order = np.argsort(scores(model, canaries), kind="stable")
    m = len(canaries.labels)
    side = int(m * guess_fraction) // 2
    guessed_out, guessed_in = order[:side], order[m - side:]
    correct = int(canaries.included[guessed_in].sum() + (~canaries.included[guessed_out]).sum())
    bound = epsilon_lower_bound(m, 2 * side, correct, delta, confidence)
    return DPAudit(name, m, int(canaries.included.sum()), 2 * side, correct, bound, confidence, delta, epsilon,
                   time.perf_counter() - started), model


def dp_canary_audits(config, bundle) -> list[DPAudit]:
    """The run's DP claim checked: two audit copies of the student, trained with the same
    canaries (test images, wrong labels, a coin each; ``audit.dp_canaries`` of them): one with
    the DP student's DP-SGD settings, one with the plain student recipe. Neither ships."""
    from kdsec.dp_sgd import fit_private
    from kdsec.models import build_model
    from kdsec.train import fit, seed_everything
    from kdsec.trainers import student_spec

    spec = student_spec(config, bundle)
    canaries = make_canaries(bundle.x_test, bundle.y_test, config.audit.dp_canaries, bundle.num_classes, config.seed)
    delta = config.student.dp.delta

    def private(x, y):
        seed_everything(config.seed)
        model = build_model(spec)
        fitted = fit_private(model, x, y, bundle.x_val, bundle.y_val, config.student.dp, label="dp-audit copy")
        return fitted.epsilon, model

    def plain(x, y):
        seed_everything(config.seed)
        model = build_model(spec)
        fit(model, x, y, bundle.x_val, bundle.y_val, config.student.train, seed=config.seed, label="non-dp audit copy")
        return None, model

    return [audit_one_run(name, train, bundle.x_train, bundle.y_train, canaries, delta)[0]
            for name, train in (("dp_student", private), ("non_dp_student", plain))]
