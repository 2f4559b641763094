"""Label review: out-of-fold probabilities, cleanlab's suspects, top losses, and the evaluate stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import make_blobs

from graft.labels import out_of_fold_proba, rank_label_issues, top_losses
from graft.tasks.evaluate import evaluate
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import class_image, make_params, write_tree

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _flip(y: np.ndarray, share: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``y`` with ``share`` of its rows moved to another class at random; the flipped rows."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(y.size, int(round(share * y.size)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, n_classes, flipped.size)) % n_classes
    return noisy, flipped


def test_out_of_fold_probabilities_do_not_memorise_a_flipped_label() -> None:
    """A head that saw a row would echo its label; out-of-fold, a flipped row gets a low p(given label)."""
    X, y = make_blobs(300, n_features=20, centers=4, cluster_std=2.0, random_state=0)
    noisy, flipped = _flip(y, 0.05, 4, seed=1)
    proba, C = out_of_fold_proba(X, noisy, seed=0)
    assert proba.shape == (300, 4) and np.allclose(proba.sum(1), 1)
    assert C in (1e-3, 1e-2, 1e-1, 1.0)
    p_given = proba[np.arange(300), noisy]
    clean = np.setdiff1d(np.arange(300), flipped)
    assert np.median(p_given[flipped]) < 0.2 < np.median(p_given[clean])


def test_cleanlab_ranks_the_flipped_labels_first() -> None:
    """5 % flipped labels on separable data: the top-ranked suspects are the flipped rows."""
    X, y = make_blobs(400, n_features=16, centers=5, cluster_std=2.5, random_state=3)
    noisy, flipped = _flip(y, 0.05, 5, seed=4)
    suspects = rank_label_issues(noisy, out_of_fold_proba(X, noisy, seed=0)[0])
    top = set(suspects[: flipped.size].tolist())
    assert len(top & set(flipped.tolist())) >= 0.8 * flipped.size  # precision = recall at k = |flipped|
    assert len(set(suspects.tolist()) & set(flipped.tolist())) >= 0.9 * flipped.size  # recall of the flagged set
    p_given = out_of_fold_proba(X, noisy, seed=0)[0][suspects, noisy[suspects]]
    assert np.all(np.diff(p_given) >= 0)  # ranked by self-confidence, lowest first


def test_top_losses_put_the_most_confident_mistakes_first() -> None:
    """Mistakes by the probability of the wrong prediction, then correct rows by the lowest p(true class)."""
    y = np.array([0, 1, 2, 0, 2, 1])
    proba = np.array(
        [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.02, 0.97, 0.01], [0.1, 0.5, 0.4], [0.1, 0.6, 0.3]]
    )
    # row 1: p(true)=0.1 is the highest loss, but row 3's mistake is the more confident (0.97 vs 0.8)
    assert top_losses(y, proba, 2).tolist() == [3, 1]
    assert top_losses(y, proba, 10).tolist() == [3, 1, 4, 2, 5, 0]


def test_evaluate_lists_images_filed_under_the_wrong_class(tmp_path: Path) -> None:
    """Two cat pictures filed as dogs lead label_issues.csv; the galleries and report sections exist."""
    raw = tmp_path / "raw"
    write_tree(raw, ("cat", "dog", "bird"), per_class=20)
    wrong = []
    for i in (100, 101):  # new cat pictures (indices the tree does not use), filed under dog/
        class_image(0, i).save(raw / "dog" / f"stray-{i}.png")
        wrong.append(f"dog/stray-{i}.png")
    params = make_params(tmp_path, {"train": {"max_epochs": 60}})
    for stage in (ingest, featurize, train):
        stage(params)
    metrics = evaluate(params)

    table = pd.read_csv(tmp_path / "reports" / "label_issues.csv")
    assert list(table.columns) == [
        "rank",
        "path",
        "split",
        "given_label",
        "suggested_label",
        "label_quality",
        "suggested_probability",
    ]
    assert set(table["path"].head(2)) == set(wrong)
    assert (table.set_index("path").loc[wrong, "suggested_label"] == "cat").all()
    assert table["label_quality"].is_monotonic_increasing
    review = json.loads((tmp_path / "metrics" / "evaluation.json").read_text())["label_review"]
    assert review == metrics["label_review"] and review["suspects"] == len(table) and review["images"] == 62
    for name in ("label_issues.png", "top_losses.png"):
        with Image.open(tmp_path / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 200
    report = (tmp_path / "reports" / "report.md").read_text(encoding="utf-8")
    assert "## Label review" in report and "](../plots/label_issues.png)" in report
    assert "## Top losses (test)" in report and "](../plots/top_losses.png)" in report
