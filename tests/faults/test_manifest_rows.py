"""Manifest rows that are not usable as they stand: each becomes one quarantine row with its reason.

A Parquet manifest carries real nulls (None, NaN) where a CSV has empty strings; they used to
become a class named ``nan`` (or ``None``), and a path holding a NUL byte raised a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tests.faults.helpers import reasons, run_ingest
from tests.helpers import write_tree


def _rows(root: Path) -> list[dict]:
    return [{"path": p.relative_to(root).as_posix(), "label": p.parent.name} for p in sorted(root.rglob("*.png"))]


def test_parquet_manifest_null_and_nan_labels_and_a_nul_path_are_quarantined(tmp_path: Path) -> None:
    """None and NaN labels are empty labels, a NUL byte in a path is refused: no class 'nan', no traceback."""
    write_tree(tmp_path / "raw", per_class=10)
    rows = _rows(tmp_path / "raw")
    rows[0]["label"] = None
    rows[10]["label"] = np.nan
    rows.append({"path": "cat/evil\0.png", "label": "cat"})
    rows.append({"path": None, "label": "dog"})
    frame = pd.DataFrame(rows)
    assert frame["label"].isna().sum() == 2
    frame.to_parquet(tmp_path / "labels.parquet")

    summary, manifest, q = run_ingest(
        tmp_path, {"data": {"manifest": str(tmp_path / "labels.parquet")}, "ingest": {"max_bad_fraction": 0.5}}
    )

    assert reasons(q) == {
        rows[0]["path"]: "empty label",
        rows[10]["path"]: "empty label",
        "cat/evil\\0.png": "path holds a NUL byte",
        "": "empty path",
    }
    assert set(manifest["label"]) == {"cat", "dog"} and len(manifest) == 18
    assert summary["classes"] == 2


def test_a_path_listed_twice_under_one_label_is_counted_once(tmp_path: Path) -> None:
    """The repeated row is quarantined with the row it repeats; the image is in the manifest once."""
    write_tree(tmp_path / "raw", per_class=10)
    rows = _rows(tmp_path / "raw")
    rows.append(dict(rows[3]))
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)

    summary, manifest, q = run_ingest(tmp_path, {"data": {"manifest": str(tmp_path / "labels.csv")}})

    assert reasons(q) == {rows[3]["path"]: "listed twice in the manifest (first at row 4)"}
    assert manifest["path"].is_unique and len(manifest) == 20
    assert summary["images"] == 20 and summary["duplicate_images"] == 0
