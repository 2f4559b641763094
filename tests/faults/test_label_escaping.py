"""Labels and paths are users' text: the report shows them as typed (no HTML, no links, one table row) and
the CSV files never hand a spreadsheet a formula (``=cmd|' /C calc'!A0``), while graft reads its own CSVs
back exactly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from graft.atomic import write_csv
from graft.tasks.evaluate import report_markdown

HOSTILE = ["<img src=x onerror=alert(1)>", "[click](javascript:alert(1))", "=cmd|' /C calc'!A0", "a|b\nc"]


def _metrics(labels: list[str]) -> dict:
    row = {"accuracy": 0.5, "macro_f1": 0.5, "balanced_accuracy": 0.5, "ece": 0.1, "n": 4}
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1} for c in labels}
    return {
        "model": {**row, "per_class": per_class},
        "baseline": row,
        "model_name": "tiny_cnn + logreg head",
        "baseline_size": 16,
        "vs_baseline": {"sentence": "no difference", "verdict": "ties"},
        "counts": {"train": 8, "val": 2, "test": 4},
    }


def test_report_shows_labels_as_text(tmp_path: Path) -> None:
    report = report_markdown(_metrics(HOSTILE))

    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "| 0.500 |" in ln]
    assert len(rows) == len(HOSTILE)  # one row per class: no newline or '|' breaks the table
    assert "<img" not in report and "&lt;img src=x onerror=alert(1)&gt;" in rows[0]
    assert "[click](" not in report and "\\[click\\](javascript:alert(1))" in rows[1]
    assert "a\\|b c" in rows[3]


def test_csv_cells_never_start_a_formula_and_read_back_exactly(tmp_path: Path) -> None:
    from graft.text import csv_unescape

    frame = pd.DataFrame({"actual": HOSTILE + ["-1", "+x"], "n": range(6)})
    write_csv(tmp_path / "confusion.csv", frame)

    raw = pd.read_csv(tmp_path / "confusion.csv", dtype=str, keep_default_na=False)
    assert not any(v.startswith(("=", "+", "@")) or (v.startswith("-") and v != "-1") for v in raw["actual"])
    assert raw["actual"][2] == "'=cmd|' /C calc'!A0" and raw["actual"][4] == "-1"  # a number stays a number
    assert list(raw["actual"].map(csv_unescape)) == list(frame["actual"])


def test_a_huge_label_is_cut_in_an_error_line(tmp_path: Path) -> None:
    """A 100,000-character label that fails a check is shown cut, with its length, in a short line."""
    import pytest

    from graft import GraftError
    from tests.faults.helpers import run_ingest
    from tests.helpers import write_tree

    write_tree(tmp_path / "raw", per_class=6)
    rows = [
        {"path": p.relative_to(tmp_path / "raw").as_posix(), "label": p.parent.name}
        for p in sorted((tmp_path / "raw").rglob("*.png"))
    ]
    rows[0]["label"] = "x" * 100_000  # one image: under ingest.min_images_per_class
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)

    with pytest.raises(GraftError) as info:
        run_ingest(tmp_path, {"data": {"manifest": str(tmp_path / "labels.csv")}, "ingest": {"max_bad_fraction": 1}})

    assert len(str(info.value)) < 300 and "... (100000 characters)" in str(info.value)
