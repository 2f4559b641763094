"""Label-issue search on the demo digits with 5 % of the training labels flipped on purpose.

Writes scikit-learn's 1,797 digit scans as class folders, ingests them, moves 5 % of the train split's
files into another class's folder (a labelling mistake), and runs the real pipeline: ingest,
featurize (EfficientNet-Lite0, last-layer features, cached), train (logistic head), evaluate. The
evaluate stage writes ``reports/label_issues.csv``; this script scores its ranking against the
flipped files: precision and recall of cleanlab's flagged set, and of its top k (k = the number flipped).

    python bench/label_issues.py --work /tmp/graft-label-bench --seeds 0 1 2

A second run reuses the feature cache under ``--work`` (about 1.5 minutes of Lite0 on two busy cores
the first time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from graft.demo import write_digits
from graft.params import Params, parse_params
from graft.stages import run_stage


def bench_params(work: Path, run: str) -> Params:
    return parse_params(
        {
            "data": {"root": str(work / run / "raw"), "out_dir": str(work / run / "data")},
            "featurize": {
                "cache_dir": str(work / "cache"),  # shared by every seed: features are keyed by content
                "out": str(work / run / "data/features.parquet"),
                "taps": ["last"],
            },
            "train": {"mode": "head", "model_dir": str(work / run / "models")},
            "evaluate": {
                "metrics_dir": str(work / run / "metrics"),
                "plots_dir": str(work / run / "plots"),
                "report": str(work / run / "reports/report.md"),
            },
        }
    )


def flip_training_labels(params: Params, share: float, seed: int) -> set[str]:
    """Move ``share`` of the train split's files into another class folder; return their new paths."""
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    train = manifest[manifest["split"] == "train"]
    rng = np.random.default_rng(seed)
    picked = train.iloc[rng.choice(len(train), int(round(share * len(train))), replace=False)]
    classes = sorted(manifest["label"].unique())
    root, moved = Path(params.data.root), set()
    for path, label in zip(picked["path"], picked["label"], strict=True):
        new = rng.choice([c for c in classes if c != label])
        target = Path(new) / Path(path).name
        (root / new).mkdir(exist_ok=True)
        (root / path).rename(root / target)
        moved.add(target.as_posix())
    return moved


def score(table: pd.DataFrame, flipped: set[str]) -> dict:
    flagged = set(table["path"])
    top_k = set(table["path"].head(len(flipped)))
    train_flagged = set(table.loc[table["split"] == "train", "path"])
    return {
        "flipped": len(flipped),
        "flagged": len(flagged),
        "precision": len(flagged & flipped) / max(len(flagged), 1),
        "recall": len(flagged & flipped) / len(flipped),
        "precision_at_k": len(top_k & flipped) / len(flipped),  # = recall at k, since k = |flipped|
        "precision_train_only": len(train_flagged & flipped) / max(len(train_flagged), 1),
    }


def run(work: Path, seed: int, share: float) -> dict:
    run_name = f"seed{seed}"
    shutil.rmtree(work / run_name, ignore_errors=True)
    params = bench_params(work, run_name)
    write_digits(params.data.root)
    run_stage("ingest", params)
    flipped = flip_training_labels(params, share, seed)
    t0 = time.perf_counter()
    for stage in ("ingest", "featurize", "train"):
        run_stage(stage, params)
    t1 = time.perf_counter()
    review = run_stage("evaluate", params)["label_review"]
    t2 = time.perf_counter()
    table = pd.read_csv(Path(params.evaluate.report).parent / "label_issues.csv", dtype={"path": str})
    return {
        "seed": seed,
        **score(table, flipped),
        "C": review["C"],
        "oof_accuracy": round(review["out_of_fold_accuracy"], 4),
        "pipeline_s": round(t1 - t0, 1),
        "evaluate_s": round(t2 - t1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-label-bench"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--share", type=float, default=0.05)
    args = ap.parse_args()
    rows = [run(args.work, s, args.share) for s in args.seeds]
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    means = frame[["precision", "recall", "precision_at_k"]].mean()
    print(json.dumps({k: round(float(v), 3) for k, v in means.items()}))


if __name__ == "__main__":
    main()
