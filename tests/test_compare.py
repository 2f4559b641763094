"""graft.compare: paired bootstrap intervals, exact McNemar, verdict and report wording."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from graft import GraftError
from graft.compare import (
    _replicate_weights,
    _weighted_scores,
    bootstrap_scores,
    compare,
    comparison_sentence,
    mcnemar,
    paired_bootstrap,
    verdict,
)

K = 4


def _predictor(y: np.ndarray, p_right: float, rng: np.random.Generator) -> np.ndarray:
    """Right with probability ``p_right``, otherwise a uniformly random wrong class (errors independent)."""
    wrong = (y + rng.integers(1, K, y.size)) % K
    return np.where(rng.random(y.size) < p_right, y, wrong)


def _population(p_a: float, p_b: float, metric: str, seed: int = 999) -> float:
    """The true metric difference, measured on a very large sample of the same process."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, 400_000)
    a, b = _predictor(y, p_a, rng), _predictor(y, p_b, rng)
    if metric == "accuracy":
        return accuracy_score(y, a) - accuracy_score(y, b)
    return f1_score(y, a, average="macro") - f1_score(y, b, average="macro")


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
@pytest.mark.parametrize("p_a, p_b", [(0.80, 0.70), (0.75, 0.75)])
def test_bootstrap_interval_covers_the_true_difference(metric, p_a, p_b):
    truth = _population(p_a, p_b, metric)
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, K, 300)
        r = paired_bootstrap(y, _predictor(y, p_a, rng), _predictor(y, p_b, rng), metric, n_boot=500, seed=seed)
        assert r["lo"] <= r["diff"] <= r["hi"]
        covered += r["lo"] <= truth <= r["hi"]
    assert covered >= 34  # nominal 95% of 40 = 38; 34 allows sampling noise but catches a broken interval


def test_bootstrap_detects_a_real_gap_and_is_zero_for_identical_predictors():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 400)
    strong, weak = _predictor(y, 0.9, rng), _predictor(y, 0.6, rng)
    r = paired_bootstrap(y, strong, weak, "macro_f1")
    assert r["lo"] > 0 and verdict(r["lo"], r["hi"]) == "wins"
    assert r["diff"] == pytest.approx(f1_score(y, strong, average="macro") - f1_score(y, weak, average="macro"))
    same = paired_bootstrap(y, weak, weak, "macro_f1")
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    assert verdict(same["lo"], same["hi"]) == "ties"


def test_bootstrap_is_paired_and_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, K, 300)
    a = _predictor(y, 0.8, rng)
    b = np.where(rng.random(y.size) < 0.03, (a + 1) % K, a)  # b = a with 3% of answers changed
    r = paired_bootstrap(y, a, b, "accuracy", seed=3)
    assert r == paired_bootstrap(y, a, b, "accuracy", seed=3)
    # Paired: far narrower than the interval of independently resampled scores (which ignores the pairing).
    unpaired = bootstrap_scores(y, a, "accuracy", seed=3) - bootstrap_scores(y, b, "accuracy", seed=4)
    assert r["hi"] - r["lo"] < 0.5 * np.ptp(np.percentile(unpaired, [2.5, 97.5]))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_replicate_scores_equal_sklearn_on_the_resample(metric):
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 5, 60), rng.integers(0, 5, 60)
    pred[pred == 4] = 3  # class 4 is never predicted, and on some resamples absent altogether
    w = next(_replicate_weights(y.size, 50, seed=7))
    ours = _weighted_scores(w, y, pred, metric, np.arange(5))
    for i in range(w.shape[0]):
        idx = np.repeat(np.arange(y.size), w[i].astype(int))
        if metric == "accuracy":
            want = accuracy_score(y[idx], pred[idx])
        else:
            want = f1_score(y[idx], pred[idx], labels=np.arange(5), average="macro", zero_division=np.nan)
        assert ours[i] == pytest.approx(want, abs=1e-12)


def test_bootstrap_is_fast():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 300)
    t0 = time.perf_counter()
    paired_bootstrap(y, _predictor(y, 0.7, rng), _predictor(y, 0.6, rng), "macro_f1", n_boot=2000)
    assert time.perf_counter() - t0 < 2.0


def test_mcnemar_matches_hand_computed_binomial_tails():
    y = np.zeros(20, int)
    a, b = np.zeros(20, int), np.zeros(20, int)
    b[:5] = 1  # 5 images only a gets right, none only b gets right, 15 both right
    assert mcnemar(y, a, b) == {"b": 5, "c": 0, "p": pytest.approx(2 * 0.5**5)}
    a, b = np.zeros(20, int), np.zeros(20, int)
    a[:2], b[2:12] = 1, 1  # b = 10 (a right only), c = 2 (b right only)
    r = mcnemar(y, a, b)
    assert (r["b"], r["c"]) == (10, 2)
    assert r["p"] == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert mcnemar(y, a, a)["p"] == 1.0  # no discordant pair


def test_verdict_follows_the_interval():
    assert verdict(0.01, 0.05) == "wins"
    assert verdict(-0.05, -0.01) == "loses"
    assert verdict(-0.01, 0.05) == "ties"
    assert verdict(0.0, 0.05) == "ties"  # an interval touching 0 includes it


def test_sentence_wording_for_the_three_verdicts():
    base = {"metric": "macro_f1", "n": 273, "p": 0.004}
    wins = comparison_sentence(
        "efficientnet_lite0 + logreg head", "the raw-pixel baseline", {**base, "diff": 0.031, "lo": 0.012, "hi": 0.050}
    )
    assert wins == (
        "efficientnet_lite0 + logreg head wins against the raw-pixel baseline: macro-F1 +3.1 pt "
        "(95% CI +1.2 to +5.0, paired bootstrap, n=273); McNemar p=0.004."
    )
    # A positive point estimate whose interval includes 0 is a tie, not a win.
    ties = comparison_sentence("A", "B", {**base, "diff": 0.04, "lo": -0.005, "hi": 0.085, "p": 0.2})
    assert ties.startswith("A is tied with B (the interval includes 0): macro-F1 +4.0 pt (95% CI -0.5 to +8.5")
    loses = comparison_sentence("A", "B", {"metric": "accuracy", "n": 50, "diff": -0.1, "lo": -0.2, "hi": -0.02})
    assert loses == "A loses against B: accuracy -10.0 pt (95% CI -20.0 to -2.0, paired bootstrap, n=50)."
    tiny_p = comparison_sentence("A", "B", {**base, "diff": 0.2, "lo": 0.1, "hi": 0.3, "p": 1e-9})
    assert tiny_p.endswith("McNemar p<0.001.")


def test_compare_combines_interval_verdict_and_mcnemar():
    rng = np.random.default_rng(4)
    y = rng.integers(0, K, 300)
    a, b = _predictor(y, 0.6, rng), _predictor(y, 0.9, rng)
    r = compare(y, a, b, "accuracy")
    assert r["verdict"] == "loses" and r["hi"] < 0
    assert r["b"] < r["c"] and r["p"] < 0.001
    assert comparison_sentence("A", "B", r).startswith("A loses against B: accuracy")


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(GraftError, match="differ in length"):
        paired_bootstrap([0, 1, 1], [0, 1], [0, 1, 0])
    with pytest.raises(GraftError, match="unknown comparison metric"):
        paired_bootstrap([0, 1], [0, 1], [0, 1], metric="auc")
    with pytest.raises(GraftError, match="empty test set"):
        mcnemar([], [], [])
