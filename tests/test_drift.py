"""Drift: the domain-classifier test, the class-mix shift, the unknown-rate hook, and a simulated week of retrains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from graft.drift import class_mix_shift, drift_markdown, feature_drift, permutations_for, unknown_rate
from tests.helpers import make_params, write_tree


def test_feature_drift_separates_a_shifted_batch_from_an_ordinary_one() -> None:
    """Same distribution: AUROC near 0.5 and a large p; one shifted direction: AUROC high and p at its floor."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(80, 12))
    same = feature_drift(reference, rng.normal(size=(20, 12)), n_permutations=99, seed=0)
    shifted_batch = rng.normal(size=(20, 12))
    shifted_batch[:, 3] += 2.0
    shifted = feature_drift(reference, shifted_batch, n_permutations=99, seed=0)
    assert same is not None and shifted is not None
    assert same.p_value > 0.05 and abs(same.auroc - 0.5) < 0.2
    assert shifted.p_value == pytest.approx(1 / 100) and shifted.auroc > 0.85
    assert (shifted.n_reference, shifted.n_new) == (80, 20)
    assert feature_drift(reference, rng.normal(size=(1, 12))) is None  # one new image: nothing to test


def test_permutations_leave_room_below_the_alert_threshold() -> None:
    assert permutations_for(0.01) == 199 and permutations_for(0.001) == 1999
    assert 1 / (permutations_for(0.05) + 1) <= 0.05 / 2


def test_class_mix_shift_tvd_and_chi_square() -> None:
    tvd, p = class_mix_shift(np.array([50, 30, 20]), np.array([5, 3, 2]))
    assert tvd == pytest.approx(0.0) and p == pytest.approx(1.0)
    tvd, p = class_mix_shift(np.array([50, 50, 0]), np.array([0, 40, 0]))
    assert tvd == pytest.approx(0.5) and p < 1e-6  # the unseen third class is dropped from the test
    assert class_mix_shift(np.array([10, 0]), np.array([3, 0])) == (0.0, 1.0)


def test_unknown_rate_is_null_without_a_threshold() -> None:
    assert unknown_rate(np.array([0.1, 0.5, 0.9, 0.95]), 0.6) == pytest.approx(0.5)
    assert unknown_rate(np.array([0.1]), None) is None and unknown_rate(None, 0.5) is None


def _photo_crops(folder, n: int, seed: int) -> None:
    """Grey camera-photo crops at the generated images' size: another domain than the striped colour fields."""
    from skimage import data

    photo, rng = data.camera(), np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y, x = rng.integers(0, 400, 2)
        Image.fromarray(photo[y : y + 96, x : x + 120]).convert("RGB").resize((40, 32)).save(folder / f"photo-{i}.png")


def test_a_simulated_week_alerts_on_the_foreign_batch_only(ws, prefect_harness) -> None:
    """Monday trains the champion; two ordinary batches raise no alert; a batch of photos does."""
    from graft.flows.retrain import retrain

    overrides = {
        "train": {"max_epochs": 40},
        "retrain": {
            "escalate_below_val_accuracy": None,
            "max_macro_f1_drop": 1.0,
            "max_class_recall_drop": 1.0,
            "models_dir": str(ws / "models"),
            "history": str(ws / "models/history.parquet"),
            "drift_alert": 0.01,
        },
    }
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(make_params(ws, overrides).model_dump()))
    runs = []
    for per_class in (16, 22, 28):  # each day adds 6 new images per class from the same generator
        write_tree(ws / "raw", per_class=per_class)
        runs.append(retrain(str(path)))
    _photo_crops(ws / "raw" / "cat", 6, seed=1)
    _photo_crops(ws / "raw" / "dog", 6, seed=2)
    runs.append(retrain(str(path)))

    assert runs[0]["drift_alert"] is None and runs[0]["drift_new_images"] is None  # no champion yet
    assert [r["drift_new_images"] for r in runs[1:]] == [12, 12, 12]
    assert [r["drift_alert"] for r in runs[1:]] == [False, False, True]
    assert all(r["drift_p_value"] > 0.01 for r in runs[1:3]) and runs[3]["drift_p_value"] <= 0.01
    assert runs[3]["drift_auroc"] > max(r["drift_auroc"] for r in runs[1:3])
    history = pd.read_parquet(ws / "models/history.parquet")
    assert history["drift_alert"].tolist() == [None, False, False, True]
    assert history["drift_p_value"].iloc[1:].tolist() == pytest.approx([r["drift_p_value"] for r in runs[1:]])
    rates = history["unknown_rate"]  # the champion's exported unknown threshold on each new batch
    assert rates.isna().iloc[0] and rates.iloc[1:].between(0, 1).all()  # day 1: no champion yet
    assert "DRIFT ALERT" in drift_markdown(runs[3]) and "No drift alert" in drift_markdown(runs[1])
    print("\nsimulated week:", [(r["drift_auroc"], r["drift_p_value"], r["class_mix_tvd"]) for r in runs[1:]])
