"""Tests for tasks.leakage: cross-split near-duplicates (blockwise, exact against brute force), exact
duplicates under two labels, leakage.csv, and the report's Leakage section written by evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graft.cache import load_feature_table
from graft.leakage import (
    COLUMNS,
    cross_split_pairs,
    exact_cross_label_rows,
    leakage_markdown,
    leakage_report,
    near_duplicate_rows,
)
from graft.tasks.evaluate import evaluate
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import make_params, run_stages, write_tree

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def brute_force(x: np.ndarray, splits: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """All cross-split pairs (earlier split first) at or above ``threshold``, from the full similarity matrix."""
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = n @ n.T
    out = set()
    for i in range(len(x)):
        for j in range(len(x)):
            if SPLIT_ORDER[splits[i]] < SPLIT_ORDER[splits[j]] and sim[i, j] >= threshold:
                out.add((i, j))
    return out


def test_pairs_match_brute_force_with_tiles_smaller_than_the_data() -> None:
    """Planted near-copies across splits are found, tile by tile, exactly as the full matrix finds them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    splits = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    x[45] = x[3] + 1e-3  # val copy of a train image
    x[55] = x[7] * 2.0  # test copy (scaled: cosine ignores the norm)
    x[58] = x[45] + 1e-3  # test copy of the val copy

    a, b, s, total = cross_split_pairs(x, splits, 0.999, block=7)

    assert (
        {(int(i), int(j)) for i, j in zip(a, b, strict=True)}
        == brute_force(x, splits, 0.999)
        >= {(3, 45), (7, 55), (45, 58)}
    )
    assert total == len(a)
    assert list(s) == sorted(s, reverse=True) and (s >= 0.999).all()
    assert all(SPLIT_ORDER[splits[i]] < SPLIT_ORDER[splits[j]] for i, j in zip(a, b, strict=True))


def test_same_split_copies_are_not_pairs() -> None:
    """Two identical vectors in one split are not leakage."""
    x = np.ones((3, 4), np.float32)
    a, b, _, total = cross_split_pairs(x, np.array(["train", "train", "test"]), 0.99)
    assert total == 2 and sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 2), (1, 2)]  # never (0, 1)


def test_zero_vectors_match_nothing() -> None:
    """An all-zero feature (e.g. a blank image through ReLU) is similar to nothing, not NaN."""
    x = np.zeros((2, 4), np.float32)
    assert cross_split_pairs(x, np.array(["train", "test"]), 0.5)[3] == 0


def test_max_pairs_keeps_the_most_similar_and_counts_all() -> None:
    """With more matches than max_pairs, the most similar are kept and the total still counts every pair."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1, 16))
    x = (base + rng.normal(scale=0.01, size=(50, 16))).astype(np.float32)
    splits = np.array(["train", "test"] * 25)
    full = cross_split_pairs(x, splits, 0.9, max_pairs=10_000)

    a, b, s, total = cross_split_pairs(x, splits, 0.9, max_pairs=7, block=4)

    assert total == full[3] == 25 * 25
    assert len(a) == 7 and np.allclose(s, full[2][:7])


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(
        np.float32,
        st.tuples(st.integers(1, 30), st.integers(1, 5)),
        elements=st.floats(-4, 4, width=32).map(lambda v: round(v, 1)),
    ),
    seed=st.integers(0, 10**6),
    block=st.integers(1, 9),
    threshold=st.floats(0.5, 1.0),
)
def test_property_tiles_equal_the_full_matrix(x: np.ndarray, seed: int, block: int, threshold: float) -> None:
    """For any features, splits, tile size and threshold the pairs equal the brute-force set (away from ties)."""
    splits = np.random.default_rng(seed).choice(["train", "val", "test"], len(x))
    n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if np.any(np.abs(n @ n.T - threshold) < 1e-5):
        return  # float32 tiles and float64 brute force may round a value at the threshold differently
    a, b, _, total = cross_split_pairs(x, splits, threshold, block=block)
    assert {(int(i), int(j)) for i, j in zip(a, b, strict=True)} == brute_force(x, splits, threshold)
    assert total == len(a)


def _manifest(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "sha256", "label", "split"])


def test_near_duplicate_rows_name_both_images_once_per_content() -> None:
    """Copies of one file count once; the row carries both paths, splits, labels and the similarity."""
    m = _manifest(
        [
            ("a.png", "s1", "cat", "train"),
            ("a-copy.png", "s1", "cat", "train"),
            ("b.png", "s2", "cat", "test"),
            ("c.png", "s3", "dog", "val"),
        ]
    )
    feats = {
        "s1": np.array([1.0, 0.0], np.float32),
        "s2": np.array([1.0, 0.001], np.float32),
        "s3": np.array([0.0, 1.0], np.float32),
    }

    rows, total = near_duplicate_rows(m, feats, 0.99)

    assert total == 1 and list(rows.columns) == COLUMNS
    assert rows.iloc[0][["kind", "path_a", "split_a", "label_a", "path_b", "split_b", "label_b"]].tolist() == [
        "near_duplicate",
        "a.png",
        "train",
        "cat",
        "b.png",
        "test",
        "cat",
    ]
    assert rows.iloc[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_exact_cross_label_rows_pair_every_label_combination() -> None:
    """Three copies under two labels give the two cross-label pairs, not the same-label one."""
    copies = _manifest(
        [
            ("x/1.png", "h", "cat", "train"),
            ("y/1.png", "h", "dog", "train"),
            ("x/2.png", "h", "cat", "train"),
            ("z.png", "k", "cat", "test"),
        ]
    )

    rows = exact_cross_label_rows(copies)

    assert rows[["path_a", "label_a", "path_b", "label_b"]].values.tolist() == [
        ["x/1.png", "cat", "y/1.png", "dog"],
        ["x/2.png", "cat", "y/1.png", "dog"],
    ]
    assert (rows["kind"] == "exact_cross_label").all() and (rows["similarity"] == 1.0).all()


def test_quarantined_conflicts_from_a_csv_manifest_get_their_labels(ws: Path) -> None:
    """With a manifest input, the labels of quarantined conflicting copies come from the manifest rows."""
    (ws / "raw/pool").mkdir(parents=True)
    write_tree(ws / "raw/pool", classes=("a", "b"), per_class=6)
    rows = [{"path": f"pool/{c}/{c}-{i:03d}.png", "label": c} for c in ("a", "b") for i in range(6)]
    rows.append({"path": "pool/a/a-001.png", "label": "b"})  # the same file listed again under a second label
    shutil.copyfile(ws / "raw/pool/a/a-002.png", ws / "raw/pool/b/copy.png")  # and a copy filed under b
    rows.append({"path": "pool/b/copy.png", "label": "b"})
    pd.DataFrame(rows).to_csv(ws / "labels.csv", index=False)
    params = make_params(ws, {"data": {"manifest": str(ws / "labels.csv")}, "ingest": {"max_bad_fraction": 0.5}})
    ingest(params)
    m = pd.read_parquet(ws / "data/manifest.parquet")
    q = pd.read_csv(ws / "data/quarantine.csv", dtype=str, keep_default_na=False)

    summary = leakage_report(params, m, q, None)

    leak = pd.read_csv(ws / "data/leakage.csv", keep_default_na=False)
    assert summary["exact_duplicates_across_labels"] == 2
    assert leak[["path_a", "label_a", "path_b", "label_b"]].values.tolist() == [
        ["pool/a/a-001.png", "a", "pool/a/a-001.png", "b"],
        ["pool/a/a-002.png", "a", "pool/b/copy.png", "b"],
    ]
    assert (leak[["split_a", "split_b"]] == "quarantined").all().all()


def test_markdown_escapes_table_cells() -> None:
    """A label with a pipe or a newline cannot break the report's table."""
    row = {
        "kind": "near_duplicate",
        "path_a": "a|b.png",
        "split_a": "train",
        "label_a": "two\nlines",
        "path_b": "c.png",
        "split_b": "test",
        "label_b": "x",
        "similarity": 0.99,
    }
    text = leakage_markdown(
        {
            "near_duplicate_threshold": 0.98,
            "near_duplicates_across_splits": 1,
            "exact_duplicates_across_labels": 0,
            "images_without_features": 0,
            "top": [row],
            "exact": [],
        },
        "data/leakage.csv",
    )
    table = [ln for ln in text.splitlines() if ln.startswith("| near_duplicate")]
    assert len(table) == 1 and "a\\|b.png" in table[0] and "two lines" in table[0]
    assert "near-duplicate pairs across splits (feature cosine similarity >= 0.98): **1**" in text


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory):
    """tiny_cnn pipeline through evaluate, with a same-image-two-labels pair kept (label_conflicts: keep)."""
    root = tmp_path_factory.mktemp("leak")
    write_tree(root / "raw", ("cat", "dog"), per_class=14)
    shutil.copyfile(root / "raw/cat/cat-002.png", root / "raw/dog/cat-in-dog-folder.png")
    params = make_params(
        root,
        {
            "train": {"max_epochs": 40},
            "ingest": {"label_conflicts": "keep"},
            "evaluate": {"near_duplicate_threshold": 0.9999},
        },
    )
    metrics = run_stages(params, ingest, featurize, train, evaluate)
    return root, params, metrics


def test_evaluate_writes_leakage_csv_matching_brute_force(evaluated) -> None:
    """leakage.csv lists exactly the brute-force near-duplicate pairs, plus the exact cross-label pair."""
    root, params, metrics = evaluated
    leak = pd.read_csv(root / "data/leakage.csv", keep_default_na=False)
    m = pd.read_parquet(root / "data/manifest.parquet").drop_duplicates("sha256").reset_index(drop=True)
    feats, _ = load_feature_table(params.featurize.out)
    x = np.stack([feats[s] for s in m["sha256"]])
    expected = {(m["path"][i], m["path"][j]) for i, j in brute_force(x, m["split"].to_numpy(), 0.9999)}

    assert expected  # the generated classes are near-copies of each other: some pairs cross splits
    near = leak[leak["kind"] == "near_duplicate"]
    assert set(zip(near["path_a"], near["path_b"], strict=True)) == expected
    exact = leak[leak["kind"] == "exact_cross_label"]
    assert exact[["path_a", "label_a", "path_b", "label_b"]].values.tolist() == [
        ["cat/cat-002.png", "cat", "dog/cat-in-dog-folder.png", "dog"]
    ]
    assert metrics["leakage"] == {
        "near_duplicate_threshold": 0.9999,
        "near_duplicates_across_splits": len(expected),
        "exact_duplicates_across_labels": 1,
        "images_without_features": 0,
    }
    assert json.loads((root / "metrics/evaluation.json").read_text())["leakage"] == metrics["leakage"]


def test_report_has_a_leakage_section(evaluated) -> None:
    """reports/report.md summarises both counts and shows the exact pair."""
    root, params, metrics = evaluated
    report = Path(params.evaluate.report).read_text(encoding="utf-8")
    section = report[report.index("## Leakage") :]
    assert f"**{metrics['leakage']['near_duplicates_across_splits']}**" in section
    assert "exact duplicates under different labels: **1**" in section
    assert "| exact_cross_label | cat/cat-002.png" in section
    assert "leakage.csv" in section


def test_without_features_exact_duplicates_are_still_reported(evaluated, tmp_path: Path) -> None:
    """Fine-tuning may run with no features.parquet: near-duplicates are skipped and the report says so."""
    root, params, _ = evaluated
    work = tmp_path / "w"
    shutil.copytree(root / "data", work / "data")
    manifest = pd.read_parquet(work / "data/manifest.parquet")
    params = make_params(work, {"ingest": {"label_conflicts": "keep"}})

    summary = leakage_report(params, manifest, None, None)

    assert summary["near_duplicates_across_splits"] == 0 and summary["exact_duplicates_across_labels"] == 1
    assert summary["images_without_features"] == len(manifest) == 29
    assert "images not checked for near-duplicates (no features): 29" in leakage_markdown(summary, "leakage.csv")
    assert pd.read_csv(work / "data/leakage.csv")["kind"].tolist() == ["exact_cross_label"]
