"""Calibration and the "unknown" answer: temperature scaling, the in-distribution score and its threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graft.model import Classifier, Head, Serving
from graft.taps import FeatureExtractor
from graft.trust import (
    auroc,
    calibrate,
    fit_temperature,
    in_distribution_score,
    leave_one_class_out,
    nll,
    reliability_table,
    threshold_for,
)


def _overconfident(n: int = 3000, k: int = 4, t_true: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / t_true): a model t_true times too confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=(n, k))
    p = np.exp(logits / t_true)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits, y


def test_temperature_scaling_recovers_the_true_temperature_and_lowers_nll() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(logits, y, t) < nll(logits, y) - 0.1


def test_threshold_keeps_the_accept_rate_of_in_distribution_images() -> None:
    logits, y = _overconfident(seed=1)
    cal = calibrate(logits, y, accept_rate=0.9)
    scores = in_distribution_score(logits, cal["temperature"])
    assert (scores >= cal["unknown"]["threshold"]).mean() == pytest.approx(0.9, abs=0.01)
    assert cal["nll_after"] < cal["nll_before"]


def test_energy_and_msp_rank_confident_above_flat_logits() -> None:
    confident = np.array([[8.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    flat = np.array([[0.1, 0.0, 0.0], [0.0, 0.2, 0.1]])
    for kind in ("energy", "msp"):
        assert auroc(in_distribution_score(confident, 1.0, kind), in_distribution_score(flat, 1.0, kind)) == 1.0
    assert threshold_for(np.array([]), 0.9) == float("-inf")


def test_reliability_table_counts_every_image() -> None:
    logits, y = _overconfident(n=500, seed=2)
    proba = torch.softmax(torch.from_numpy(logits), 1).numpy()
    table = reliability_table(y, proba, bins=10)
    assert sum(r["count"] for r in table) == 500
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["confidence"] <= 1 for r in table)


def test_leave_one_class_out_rejects_the_unseen_class() -> None:
    """Four well-separated classes: a head trained without class k scores class k's images lower."""
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=6.0, size=(4, 8))
    y = np.repeat(np.arange(4), 60)
    x = centres[y] + rng.normal(size=(240, 8))
    y_te = np.repeat(np.arange(4), 20)
    x_te = centres[y_te] + rng.normal(size=(80, 8))
    out = leave_one_class_out(x, y, x_te, y_te, "linear", {"C": 1.0}, accept_rate=0.95)
    assert out["classes"] == 4 and out["auroc_distance"] > 0.95  # far from every seen class: caught by distance
    assert 0.0 <= out["auroc_msp"] <= 1.0 and 0.0 <= out["auroc_energy"] <= 1.0  # logit scores: often weak here
    assert 0.0 <= out["rejected_at_threshold"] <= 1.0


@pytest.mark.parametrize("score", ["energy", "msp"])
def test_serving_graph_outputs_calibrated_probabilities_and_the_score(score: str) -> None:
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
    model = Classifier(FeatureExtractor(body, (0.5,) * 3, (0.25,) * 3), Head(3, 4))
    model.temperature = 2.5
    x = torch.rand(5, 3, 8, 8)
    proba, s = Serving(model, score)(x)
    z = model.logits(x).detach().numpy()
    np.testing.assert_allclose(proba.detach().numpy(), torch.softmax(torch.from_numpy(z) / 2.5, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(s.detach().numpy(), in_distribution_score(z, 2.5, score), rtol=1e-5, atol=1e-6)
