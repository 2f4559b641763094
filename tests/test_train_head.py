"""Tests for tasks.train_head: the head matches sklearn, is reproducible, stops early, and saves safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from graft import GraftError
from graft.backbones import build_backbone
from graft.cache import load_feature_table, select_columns, tap_columns
from graft.dataset import split_arrays
from graft.heads import class_weights, fit_head
from graft.model import MODEL_FORMAT, head_from_payload, load_model
from graft.params import TrainParams
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import make_params, write_tree

K = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(seed: int, n_test_extra: int = 0) -> tuple[np.ndarray, ...]:
    """600 samples x 64 features, 4 classes, split 60/20/20; optionally more test draws."""
    x, y = make_classification(
        n_samples=600 + n_test_extra,
        n_features=64,
        n_informative=12,
        n_redundant=8,
        n_classes=K,
        n_clusters_per_class=1,
        random_state=seed,
    )
    x = x.astype(np.float32)
    return x[:360], y[:360], x[360:480], y[360:480], x[480:], y[480:]


def _accuracy(head, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on features ``x`` with labels ``y``."""
    with torch.no_grad():
        return float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_logreg_head_matches_sklearn() -> None:
    """The logreg head's held-out accuracy is at least sklearn's LogisticRegression minus 0.01."""
    # Each problem trains on 360 and validates on 120 samples (60/20 of 600); the test set adds
    # 2000 more draws from the same distribution and the comparison averages 4 problems, so the
    # sampling noise of the difference stays well below the 0.01 margin (one 120-image test set
    # alone swings by +-0.05 between two equally good linear models).
    ours, theirs = [], []
    for seed in range(4):
        x_tr, y_tr, x_val, y_val, x_te, y_te = _problem(seed, n_test_extra=2000)
        head, _ = fit_head(x_tr, y_tr, x_val, y_val, K, TrainParams(head="logreg"), seed=0)
        ours.append(_accuracy(head, x_te, y_te))
        sk = make_pipeline(StandardScaler(), LogisticRegression()).fit(x_tr, y_tr)
        theirs.append(float(sk.score(x_te, y_te)))
    assert np.mean(ours) >= np.mean(theirs) - 0.01, (ours, theirs)
    assert min(ours) > 1 / K + 0.2  # and each one actually learned


def test_same_seed_same_weights() -> None:
    """Two fits with the same seed give bit-identical weights and history; another seed differs."""
    x_tr, y_tr, x_val, y_val, _, _ = _problem(0)
    tp = TrainParams(head="mlp", hidden=32, max_epochs=20)
    a, ha = fit_head(x_tr, y_tr, x_val, y_val, K, tp, seed=5)
    b, hb = fit_head(x_tr, y_tr, x_val, y_val, K, tp, seed=5)
    c, _ = fit_head(x_tr, y_tr, x_val, y_val, K, tp, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ha == hb
    assert not torch.equal(sa["net.0.weight"], sc["net.0.weight"])


def test_class_weights_inverse_frequency() -> None:
    """class_weights is n / (K * n_c), and 0 for a class absent from the train split."""
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = class_weights(y, 4)
    n = len(y)
    expected = [n / (4 * 6), n / (4 * 2), n / (4 * 4), 0.0]
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected)
    balanced = class_weights(np.array([0, 1, 2, 0, 1, 2]), 3)
    assert balanced.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_weights_help_the_minority_class() -> None:
    """On imbalanced data, weighting the loss raises the minority class's recall."""
    x, y = make_classification(
        n_samples=1200,
        n_features=16,
        n_informative=4,
        n_classes=2,
        weights=[0.9, 0.1],
        class_sep=0.5,
        flip_y=0,
        random_state=1,
    )
    x = x.astype(np.float32)
    x_tr, y_tr, x_val, y_val, x_te, y_te = x[:720], y[:720], x[720:960], y[720:960], x[960:], y[960:]

    def minority_recall(weighted: bool) -> float:
        """Test recall of class 1 for a head fitted with or without class weights."""
        head, _ = fit_head(x_tr, y_tr, x_val, y_val, 2, TrainParams(class_weights=weighted))
        with torch.no_grad():
            pred = head(torch.from_numpy(x_te)).argmax(1).numpy()
        return float((pred[y_te == 1] == 1).mean())

    assert minority_recall(True) > minority_recall(False)


def test_early_stopping() -> None:
    """With small patience the fit stops long before max_epochs and keeps the best-val-loss epoch."""
    x_tr, y_tr, x_val, y_val, _, _ = _problem(1)
    tp = TrainParams(head="mlp", hidden=256, dropout=0.0, lr=0.01, max_epochs=500, patience=3)
    head, history = fit_head(x_tr, y_tr, x_val, y_val, K, tp)
    assert len(history) < tp.max_epochs
    losses = [h["val_loss"] for h in history]
    best = int(np.argmin(losses))
    assert len(history) == best + 1 + tp.patience  # stopped exactly `patience` epochs after the best
    assert all(h["val_loss"] >= losses[best] - 1e-6 for h in history[best + 1 :])
    with torch.no_grad():
        kept = float(torch.nn.functional.cross_entropy(head(torch.from_numpy(x_val)), torch.from_numpy(y_val)))
    assert kept == pytest.approx(losses[best], abs=1e-5)
    assert not head.training


def test_mlp_head_above_chance() -> None:
    """The MLP head learns the generated problem well above chance."""
    x_tr, y_tr, x_val, y_val, x_te, y_te = _problem(2)
    head, history = fit_head(x_tr, y_tr, x_val, y_val, K, TrainParams(head="mlp", hidden=64))
    assert _accuracy(head, x_te, y_te) > 2 / K
    assert history[-1]["train_accuracy"] > 2 / K


def test_head_without_val_split_monitors_train() -> None:
    """An empty validation split falls back to monitoring the train loss (no crash, finite losses)."""
    x_tr, y_tr, _, _, x_te, y_te = _problem(3)
    empty_x, empty_y = np.zeros((0, 64), np.float32), np.zeros(0, np.int64)
    head, history = fit_head(x_tr, y_tr, empty_x, empty_y, K, TrainParams(max_epochs=30))
    assert len(history) == 30
    assert all(np.isfinite(h["val_loss"]) for h in history)
    assert _accuracy(head, x_te, y_te) > 1 / K + 0.2


@pytest.fixture
def trained(ws: Path):
    """A workspace after ingest, featurize and train on tiny_cnn features."""
    write_tree(ws / "raw", ("cat", "dog", "bird"), per_class=12)
    params = make_params(ws, {"train": {"max_epochs": 60}})
    ingest(params)
    featurize(params)
    summary = train(params)
    return ws, params, summary


def test_train_writes_loadable_model(trained) -> None:
    """train() writes models/model.pt that load_model reads back into a working head."""
    ws, params, summary = trained
    payload = load_model(ws / "models" / "model.pt")
    classes = json.loads((ws / "data" / "classes.json").read_text())["classes"]
    assert payload["format"] == MODEL_FORMAT
    assert payload["classes"] == classes == ["bird", "cat", "dog"]
    assert payload["head"]["dim"] == 32
    assert payload["backbone"]["name"] == "tiny_cnn"
    assert payload["backbone"]["fingerprint"] == build_backbone("tiny_cnn").fingerprint
    assert len(payload["history"]) == summary["epochs"] <= 60
    manifest = pd.read_parquet(ws / "data" / "manifest.parquet")
    feats, meta = load_feature_table(params.featurize.out)
    x, y = split_arrays(manifest, feats, classes, "train")
    x = select_columns(x, tap_columns(meta, payload["backbone"]["taps"]))
    head = head_from_payload(payload)
    with torch.no_grad():
        logits = head(torch.from_numpy(x))
    assert logits.shape == (len(y), 3)
    assert torch.isfinite(logits).all()


def test_train_writes_metrics(trained) -> None:
    """metrics/train.json records the epochs, the best epoch and the split sizes."""
    ws, params, summary = trained
    written = json.loads((ws / "metrics" / "train.json").read_text())
    assert written == summary
    manifest = pd.read_parquet(ws / "data" / "manifest.parquet")
    assert written["train_images"] == int((manifest["split"] == "train").sum())
    assert written["val_images"] == int((manifest["split"] == "val").sum())
    assert 1 <= written["best_epoch"] <= written["epochs"]
    assert written["mode"] == "head" and written["head"] == "logreg"
    assert 0.0 <= written["val_accuracy"] <= 1.0


def test_load_model_rejects_random_bytes(tmp_path: Path) -> None:
    """A file of random bytes is a one-line GraftError naming it."""
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1024))
    with pytest.raises(GraftError) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_load_model_missing(tmp_path: Path) -> None:
    """A missing model file says to run the train stage."""
    with pytest.raises(GraftError, match="run the train stage"):
        load_model(tmp_path / "nope.pt")


class _Evil:
    """A class a weights-only unpickler must refuse to build."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_load_model_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    """A checkpoint carrying arbitrary Python objects is refused (weights_only=True)."""
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT, "payload": _Evil()}, path)
    with pytest.raises(GraftError, match="cannot load model"):
        load_model(path)


def test_load_model_rejects_foreign_state_dict(tmp_path: Path) -> None:
    """A readable torch file that is not a graft model is rejected by its format tag."""
    path = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(GraftError, match="is not a graft model"):
        load_model(path)
