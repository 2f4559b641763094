"""Leakage: images that let the test (or val) split peek at the training data.

Written by the evaluate stage, which has both the manifest and the cached features, to
``<data.out_dir>/leakage.csv`` (one row per pair, highest similarity first):

* ``exact_cross_label``: the same bytes under two labels. Ingest quarantines both copies by default
  (``ingest.label_conflicts: quarantine``) or keeps them in one split (``keep``); either way the
  pair is listed here so the labels can be fixed.
* ``near_duplicate``: two different files in different splits whose backbone features have cosine
  similarity at or above ``evaluate.near_duplicate_threshold`` (a resized, re-encoded or lightly
  edited copy). They inflate test scores; the report counts them, nothing is moved.

Exact duplicates across splits cannot occur: ingest puts identical bytes in one split.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.atomic import write_csv
from graft.dataset import SPLITS, discover_folders, discover_manifest
from graft.images import BadImage, read_regular
from graft.params import Params
from graft.text import md_cell

COLUMNS = ["kind", "path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "similarity"]
MAX_ROWS = 10_000  # pairs kept in leakage.csv (most similar first); the summary counts every pair
BLOCK = 2048  # rows per similarity tile: a tile is BLOCK x BLOCK float32 (16 MiB)
CONFLICT_REASON = "same image under labels"  # how ingest words a quarantined label conflict


def _keep_top(i: np.ndarray, j: np.ndarray, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` most similar pairs, ties broken by index so the result is deterministic."""
    order = np.lexsort((j, i, -s))[:k]
    return i[order], j[order], s[order]


def cross_split_pairs(
    feats: np.ndarray, splits: np.ndarray, threshold: float, max_pairs: int = MAX_ROWS, block: int = BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pairs of rows in different splits whose cosine similarity is at least ``threshold``.

    Similarities are computed one ``block`` x ``block`` tile at a time, only between splits
    (train-val, train-test, val-test), so memory stays bounded however many images there are.

    Args:
        feats: one feature vector per row (N, D).
        splits: the split of each row (N,), values in train, val, test.
        threshold: cosine similarity at or above which a pair is reported.
        max_pairs: the most pairs returned (the most similar); the count covers all.
        block: tile side.

    Returns:
        Row indices ``a`` (earlier split) and ``b`` (later split), their similarities, most similar
        first, and the total number of pairs found.
    """
    x = np.asarray(feats, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # a zero vector is similar to nothing
    found_a, found_b, found_s, total = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], 0
    members = {s: np.flatnonzero(np.asarray(splits) == s) for s in SPLITS}
    for sa, sb in itertools.combinations(SPLITS, 2):
        ia, ib = members[sa], members[sb]
        for r in range(0, len(ia), block):
            rows = ia[r : r + block]
            for c in range(0, len(ib), block):
                cols = ib[c : c + block]
                sim = x[rows] @ x[cols].T
                hr, hc = np.nonzero(sim >= threshold)
                total += len(hr)
                found_a.append(rows[hr])
                found_b.append(cols[hc])
                found_s.append(sim[hr, hc])
                if sum(map(len, found_a)) > 2 * max_pairs:  # prune as we go: a low threshold could match N^2 pairs
                    top = _keep_top(
                        np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s), max_pairs
                    )
                    found_a, found_b, found_s = [top[0]], [top[1]], [top[2]]
    a, b, s = _keep_top(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s), max_pairs)
    return a, b, s, total


def near_duplicate_rows(
    manifest: pd.DataFrame, features: dict[str, np.ndarray], threshold: float, max_pairs: int = MAX_ROWS
) -> tuple[pd.DataFrame, int]:
    """Near-duplicate pairs across splits, one row per pair of distinct images (by content hash)."""
    images = manifest.drop_duplicates("sha256")  # copies of one file share a split: compare each once
    images = images[images["sha256"].isin(features.keys())].reset_index(drop=True)
    if images.empty:
        return pd.DataFrame(columns=COLUMNS), 0
    x = np.stack([features[s] for s in images["sha256"]])
    a, b, sim, total = cross_split_pairs(x, images["split"].to_numpy(), threshold, max_pairs)
    ra, rb = images.iloc[a].reset_index(drop=True), images.iloc[b].reset_index(drop=True)
    rows = pd.DataFrame(
        {
            "kind": "near_duplicate",
            "path_a": ra["path"],
            "split_a": ra["split"],
            "label_a": ra["label"],
            "path_b": rb["path"],
            "split_b": rb["split"],
            "label_b": rb["label"],
            "similarity": np.round(sim.astype(np.float64), 6),
        },
        columns=COLUMNS,
    )
    return rows, total


def exact_cross_label_rows(copies: pd.DataFrame) -> pd.DataFrame:
    """Pairs of files with the same bytes (``sha256``) but different labels.

    Args:
        copies: rows of path, sha256, label, split (split may be ``quarantined``).
    """
    out = []
    for _, group in copies.sort_values("path", kind="stable").groupby("sha256", sort=True):
        if group["label"].nunique() < 2:
            continue
        for x, y in itertools.combinations(group.itertuples(index=False), 2):
            if x.label != y.label:
                out.append(
                    {
                        "kind": "exact_cross_label",
                        "path_a": x.path,
                        "split_a": x.split,
                        "label_a": x.label,
                        "path_b": y.path,
                        "split_b": y.split,
                        "label_b": y.label,
                        "similarity": 1.0,
                    }
                )
    return pd.DataFrame(out, columns=COLUMNS)


def quarantined_conflicts(params: Params, quarantine: pd.DataFrame) -> pd.DataFrame:
    """The files ingest quarantined as label conflicts, with their hash and label (split ``quarantined``).

    The quarantine record holds only path and reason, so the label is found the way ingest found
    it (the class folder or the manifest row) and the hash is recomputed from the few files concerned.
    """
    paths = quarantine.loc[quarantine["reason"].str.startswith(CONFLICT_REASON), "path"].tolist()
    if not paths:
        return pd.DataFrame(columns=["path", "sha256", "label", "split"])
    root = Path(params.data.root)
    try:
        cands = (
            discover_manifest(root, Path(params.data.manifest))[0]
            if params.data.manifest
            else discover_folders(root, params.ingest.allow_links_outside_root)[0]
        )
    except GraftError:  # the data changed since ingest; the counts in ingest's summary still stand
        cands = []
    labels: dict[str, list[str]] = {}
    for c in cands:  # a manifest may list one file twice, under two labels: keep them in order
        labels.setdefault(c.rel, []).append(c.label)
    rows = []
    for p in paths:
        try:
            sha = hashlib.sha256(read_regular(root / p, params.ingest.max_file_bytes)).hexdigest()
        except (OSError, BadImage):  # gone, or no longer a regular file of a sane size: nothing to report
            continue
        mine = labels.get(p) or ["?"]
        rows.append(
            {"path": p, "sha256": sha, "label": mine.pop(0) if len(mine) > 1 else mine[0], "split": "quarantined"}
        )
    return pd.DataFrame(rows, columns=["path", "sha256", "label", "split"])


def leakage_report(
    params: Params, manifest: pd.DataFrame, quarantine: pd.DataFrame | None, features: dict[str, np.ndarray] | None
) -> dict:
    """Find both kinds of leakage, write ``<data.out_dir>/leakage.csv``, return a summary.

    Args:
        params: the pipeline params (``evaluate.near_duplicate_threshold``, ``data.*``).
        manifest: the ingest manifest.
        quarantine: ingest's quarantine table, if there is one.
        features: sha256 -> feature vector (the featurize output); ``None`` skips near-duplicates.
    """
    threshold = params.evaluate.near_duplicate_threshold
    copies = manifest[["path", "sha256", "label", "split"]]
    if quarantine is not None and len(quarantine):
        copies = pd.concat([copies, quarantined_conflicts(params, quarantine)], ignore_index=True)
    exact = exact_cross_label_rows(copies)
    near, n_near = (
        near_duplicate_rows(manifest, features or {}, threshold)
        if features is not None
        else (pd.DataFrame(columns=COLUMNS), 0)
    )
    table = pd.concat([exact, near], ignore_index=True) if len(exact) else near
    write_csv(Path(params.data.out_dir) / "leakage.csv", table[COLUMNS])
    missing = int((~manifest["sha256"].isin((features or {}).keys())).sum()) if features is not None else len(manifest)
    return {
        "near_duplicate_threshold": threshold,
        "near_duplicates_across_splits": int(n_near),
        "exact_duplicates_across_labels": int(len(exact)),
        "images_without_features": missing,
        "top": near.head(5).to_dict("records"),
        "exact": exact.head(5).to_dict("records"),
    }


def leakage_markdown(summary: dict, csv_path: str) -> str:
    """The report's Leakage section."""

    cell = md_cell  # labels and paths may hold '|', newlines or HTML: keep the table a table, and text

    lines = [
        "## Leakage",
        "",
        f"- near-duplicate pairs across splits (feature cosine similarity >= {summary['near_duplicate_threshold']:g}): "
        f"**{summary['near_duplicates_across_splits']}**",
        f"- exact duplicates under different labels: **{summary['exact_duplicates_across_labels']}**",
    ]
    if summary["images_without_features"]:
        lines.append(f"- images not checked for near-duplicates (no features): {summary['images_without_features']}")
    lines.append(f"- every pair: `{csv_path}`")
    shown = summary["exact"] + summary["top"]
    if shown:
        lines += ["", "| kind | image A (split, label) | image B (split, label) | similarity |", "|---|---|---|---|"]
        lines += [
            f"| {r['kind']} | {cell(r['path_a'])} ({r['split_a']}, {cell(r['label_a'])}) | "
            f"{cell(r['path_b'])} ({r['split_b']}, {cell(r['label_b'])}) | {r['similarity']:.4f} |"
            for r in shown
        ]
    if summary["near_duplicates_across_splits"]:
        lines += [
            "",
            "Near-duplicates across splits make test scores optimistic: remove one copy of each pair "
            "or keep both in one split (e.g. with a manifest `split` column).",
        ]
    return "\n".join(lines) + "\n"
