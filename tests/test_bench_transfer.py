"""bench/transfer.py's target lines: each comparison quotes the paired interval of the difference on the rows'
kept held-out predictions, so a PASS or FAIL inside the noise of a few hundred images says so."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_bench


@pytest.fixture(scope="module")
def transfer():
    return load_bench("transfer")


def _keep(set_dir: Path, row: str, labels: list[str], guesses: list[str]) -> None:
    path = set_dir / "runs" / row / "heldout_preds.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["path", "best_guess"])
        w.writeheader()
        for i, (y, g) in enumerate(zip(labels, guesses, strict=True)):
            w.writerow({"path": str(set_dir / "heldout" / y / f"{i:04d}.png"), "best_guess": g})


def test_every_auto_check_quotes_the_paired_interval_of_its_difference(transfer, tmp_path):
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["a", "b", "c"], 300))
    flip = {"a": "b", "b": "c", "c": "a"}

    def noisy(error: float) -> list[str]:
        return [flip[y] if rng.random() < error else y for y in labels]

    preds = {"auto": noisy(0.10), "probe": noisy(0.12), "pixels": noisy(0.40), "head": noisy(0.20)}
    for row, guesses in preds.items():
        _keep(tmp_path, row, labels, guesses)
    rows = {
        row: {"macro_f1": load_bench("transfer_scores").macro_f1(np.array(labels), np.array(g))}
        for row, g in preds.items()
    }
    lines = transfer.targets(rows, "macro_f1", tmp_path, seed=0)

    interval = re.compile(r"paired 95% CI ([+-]\d+\.\d) to ([+-]\d+\.\d) pt, McNemar p=(\d\.\d\d)")
    for check, ref, allowance in (
        ("best single - 0.5 pt", "head", 0.005),
        ("raw-pixel LR", "pixels", 0),
        ("sklearn probe", "probe", 0),
    ):
        line = lines[f"auto >= {check}"]
        assert line.startswith("PASS" if rows["auto"]["macro_f1"] >= rows[ref]["macro_f1"] - allowance else "FAIL")
        lo, hi, _ = interval.search(line).groups()
        gap = 100 * (rows["auto"]["macro_f1"] - rows[ref]["macro_f1"])
        assert float(lo) <= gap <= float(hi)  # the interval is around this difference, not another pair's
    lo, hi, p = interval.search(lines["auto >= raw-pixel LR"]).groups()
    assert float(lo) > 0 and float(p) < 0.05  # 30 points apart on 300 images: resolved
    assert "n/a" in lines["auto >= sklearn probe on graft's train+val"]  # that row did not run


def test_no_interval_without_both_rows_kept_predictions(transfer, tmp_path):
    labels = ["a", "b"] * 20
    _keep(tmp_path, "auto", labels, labels)
    rows = {"auto": {"macro_f1": 1.0}, "probe": {"macro_f1": 0.9}}
    line = transfer.targets(rows, "macro_f1", tmp_path)["auto >= sklearn probe"]
    assert line == "PASS (auto 1.0000 vs probe 0.9000)"  # the probe's predictions were not kept
    same = transfer.targets(rows, "macro_f1", None)["auto >= sklearn probe"]
    assert same == line


def test_the_int8_probe_check_compares_the_same_folds_and_only_the_features():
    checks = load_bench("transfer_checks")
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c"]), 60)
    x = rng.normal(size=(len(y), 20)) + 1.5 * (y[:, None] == np.array(["a", "b", "c"] * 6 + ["a", "b"])[None, :])
    same = checks.paired_cv_gaps(x, x.copy(), y, 1.0, "macro_f1", repeats=3)
    assert same.shape == (3, 2) and np.all(same == 0.0)  # same features, same folds, same C: nothing differs
    blurred = checks.paired_cv_gaps(x, x + rng.normal(scale=3.0, size=x.shape), y, 1.0, "accuracy", repeats=3)
    assert np.all(blurred[:, 0] < -0.2)  # features drowned in noise lose on every repeat
    shifted = checks.paired_cv_gaps(x, 0.5 * x + rng.normal(scale=2.0, size=20), y, 1.0, "accuracy", repeats=3)
    assert np.all(np.abs(shifted[:, 0]) <= 1 / len(y))  # its scaler undoes a per-channel map: nothing lost ...
    assert np.all(shifted[:, 1] < -0.2)  # ... until it is served the unshifted features: the train/serve skew
