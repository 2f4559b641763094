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
    rows = {row: {"macro_f1": transfer.macro_f1(np.array(labels), np.array(g))} for row, g in preds.items()}
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
