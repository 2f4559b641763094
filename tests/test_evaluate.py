"""Tests for tasks.evaluate: calibration and classification metrics, and the evaluate stage's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from graft import GraftError
from graft.metrics import classification_metrics, expected_calibration_error
from graft.tasks.evaluate import evaluate
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import make_params, write_tree

CLASSES = ("cat", "dog", "bird")
METRIC_KEYS = {"accuracy", "macro_f1", "balanced_accuracy", "ece", "n"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ece_zero_for_confident_correct_predictions() -> None:
    """One-hot probabilities that are all correct have zero calibration error."""
    y = np.array([0, 2, 1, 1, 0])
    proba = np.eye(3)[y]
    assert expected_calibration_error(y, proba) == 0.0
    assert expected_calibration_error(y, proba, bins=2) == 0.0


def test_ece_one_for_confident_wrong_predictions() -> None:
    """One-hot probabilities that are all wrong have calibration error 1."""
    y = np.array([0, 1, 2])
    proba = np.eye(3)[[1, 2, 0]]
    assert expected_calibration_error(y, proba) == pytest.approx(1.0)


def test_ece_hand_computed() -> None:
    """ECE on three predictions matches the value worked out by hand."""
    y = np.array([0, 1, 1])
    # confidences 0.95 (correct), 0.72 (correct), 0.78 (wrong: predicts 0, truth 1)
    proba = np.array([[0.95, 0.05], [0.28, 0.72], [0.78, 0.22]])
    # 10 bins: {0.95} alone -> |1 - 0.95| = 0.05, weight 1/3;
    # {0.72, 0.78} share (0.7, 0.8] -> accuracy 1/2, mean confidence 0.75 -> 0.25, weight 2/3.
    expected = (1 / 3) * 0.05 + (2 / 3) * 0.25
    assert expected_calibration_error(y, proba, bins=10) == pytest.approx(expected, abs=1e-12)
    # One bin: |accuracy 2/3 - mean confidence (0.95 + 0.72 + 0.78) / 3| = |0.6667 - 0.8167| = 0.15.
    assert expected_calibration_error(y, proba, bins=1) == pytest.approx(0.15, abs=1e-12)


def test_classification_metrics_match_sklearn() -> None:
    """Accuracy, macro-F1 and balanced accuracy agree with sklearn on a random example."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    y = rng.integers(0, 4, 200)
    proba = rng.dirichlet(np.ones(4), 200)
    proba[np.arange(100), y[:100]] += 1.0  # half the rows lean to the truth, so scores are not all chance
    proba /= proba.sum(1, keepdims=True)
    pred = proba.argmax(1)
    m = classification_metrics(y, proba, classes)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=5e-5)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=5e-5)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=5e-5)
    assert m["ece"] == pytest.approx(expected_calibration_error(y, proba), abs=5e-5)
    assert m["n"] == 200
    assert set(m["per_class"]) == set(classes)
    assert sum(v["support"] for v in m["per_class"].values()) == 200
    per_f1 = f1_score(y, pred, average=None)
    assert [m["per_class"][c]["f1"] for c in classes] == pytest.approx(per_f1, abs=5e-5)


def test_classification_metrics_absent_class() -> None:
    """A class never predicted nor present gets zero support and no crash."""
    y = np.array([0, 0, 1, 1])
    proba = np.eye(3)[[0, 1, 1, 1]]
    m = classification_metrics(y, proba, ["x", "y", "z"])
    assert m["per_class"]["z"]["support"] == 0
    assert m["accuracy"] == pytest.approx(0.75)


def _pipeline(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 14):
    """Generate images under ``root`` and run ingest, featurize and train; return the params."""
    (root / "raw").mkdir(parents=True, exist_ok=True)
    write_tree(root / "raw", classes, per_class=per_class)
    params = make_params(root, {"train": {"max_epochs": 80}})
    ingest(params)
    featurize(params)
    train(params)
    return params


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory):
    """A workspace after the whole pipeline through evaluate (built once for this module)."""
    root = tmp_path_factory.mktemp("eval")
    params = _pipeline(root)
    return root, params, evaluate(params)


def test_metrics_json_sections(evaluated) -> None:
    """evaluation.json holds model and baseline sections with every metric key (metrics.json: the headline)."""
    root, params, returned = evaluated
    m = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert m == json.loads(json.dumps(returned))
    assert METRIC_KEYS | {"per_class"} <= set(m["model"])
    assert set(m["baseline"]) >= METRIC_KEYS
    for section in ("model", "baseline"):
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "ece"):
            assert 0.0 <= m[section][key] <= 1.0, (section, key)
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    n_test = int((manifest["split"] == "test").sum())
    assert n_test > 0
    assert m["model"]["n"] == m["baseline"]["n"] == n_test
    assert set(m["model"]["per_class"]) == set(CLASSES)
    assert m["counts"] == {s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")}
    assert m["model_name"] == "tiny_cnn + logreg head"


def test_confusion_csv(evaluated) -> None:
    """confusion.csv has actual,predicted and one row per test image, consistent with the metrics."""
    root, params, metrics = evaluated
    conf = pd.read_csv(root / "metrics" / "confusion.csv")
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    assert list(conf.columns) == ["actual", "predicted"]
    assert len(conf) == len(test)
    assert sorted(conf["actual"]) == sorted(test["label"])
    assert set(conf["predicted"]) <= set(CLASSES)
    assert metrics["model"]["accuracy"] == pytest.approx((conf["actual"] == conf["predicted"]).mean(), abs=5e-5)
    for c in CLASSES:
        assert metrics["model"]["per_class"][c]["support"] == int((conf["actual"] == c).sum())


@pytest.mark.parametrize("name", ["confusion.png", "reliability.png"])
def test_evaluate_plots_are_pngs(evaluated, name: str) -> None:
    """plots/confusion.png and plots/reliability.png (DVC outputs of evaluate) are valid PNG images."""
    root, _, _ = evaluated
    path = root / "plots" / name
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 100 and img.height > 100
        img.verify()


def test_report_has_model_and_baseline_rows(evaluated) -> None:
    """reports/report.md shows the model row and the raw-pixel baseline row with their numbers."""
    root, params, m = evaluated
    report = (root / "reports" / "report.md").read_text(encoding="utf-8")
    lines = report.splitlines()
    model_rows = [ln for ln in lines if ln.startswith(f"| {m['model_name']} |")]
    base_rows = [ln for ln in lines if ln.startswith(f"| baseline: raw pixels {params.evaluate.baseline_size}x")]
    assert len(model_rows) == 1 and len(base_rows) == 1
    assert f"{m['model']['accuracy']:.4f}" in model_rows[0]
    assert f"{m['baseline']['macro_f1']:.4f}" in base_rows[0]
    for c in CLASSES:
        assert any(ln.startswith(f"| {c} |") for ln in lines), c


def test_no_tmp_files_after_evaluate(evaluated) -> None:
    """No temporary file is left beside any evaluate output."""
    root, _, _ = evaluated
    for d in ("metrics", "plots", "reports"):
        assert not [p for p in (root / d).iterdir() if p.name.endswith(".tmp")]


def test_empty_test_split_is_an_error(tmp_path: Path, evaluated) -> None:
    """A manifest without test images fails with a clear message."""
    root, params, _ = evaluated
    work = tmp_path / "w"
    shutil.copytree(root, work)
    params = make_params(work)
    path = work / "data" / "manifest.parquet"
    manifest = pd.read_parquet(path)
    manifest["split"] = manifest["split"].replace("test", "train")
    manifest.to_parquet(path, index=False)
    with pytest.raises(GraftError, match="test split is empty"):
        evaluate(params)


def test_class_map_mismatch_is_an_error(tmp_path: Path, evaluated) -> None:
    """A model trained on other classes than classes.json is refused."""
    root, _, _ = evaluated
    work = tmp_path / "w"
    shutil.copytree(root, work)
    (work / "data" / "classes.json").write_text(json.dumps({"classes": ["ant", "bee", "cow"]}))
    with pytest.raises(GraftError, match="model classes differ"):
        evaluate(make_params(work))


def test_out_of_domain_photos_are_scored_by_every_unknown_score(evaluated) -> None:
    """The real photos go through the model; the shipped score's rejection uses the shipped threshold, and every
    score is also compared at its own threshold on the test split (so energy and msp can be chosen by data)."""
    root, params, m = evaluated
    photos = m["unknown"]["out_of_domain_photos"]
    assert photos["images"] >= 4 and 0.0 <= photos["rejected"] <= 1.0
    assert set(photos["rejected_by_score"]) == {"energy", "msp"}
    assert all(0.0 <= v <= 1.0 for v in photos["rejected_by_score"].values())
