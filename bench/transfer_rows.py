"""bench/transfer.py's rows: the scikit-learn rows (pixels and the probes) and graft's rows, each graft row in a
fresh project of its own, scored by ``graft predict`` on the held-out folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from transfer_scores import (
    class_files,
    fit_probe,
    lite0_features,
    macro_f1,
    pixel_features,
    score,
    write_csv_rows,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft import GraftError  # noqa: E402 - after sys.path points at this checkout
from graft.atomic import write_text  # noqa: E402

STAGES = ("ingest", "featurize", "train", "evaluate", "export")
PROBE_SEEDS = 5  # the probe row also reports its held-out score under 4 other CV fold seeds (its own noise)


def sklearn_row(kind: str, set_dir: Path, seed: int) -> dict:
    """The pixels or probe row: features of pool and held-out images, probe fit on the pool (``probe_trainval``:
    on the pool images graft's ingest puts in train or val; ``probe_int8``: on the int8 engine's features).

    Wall time counts decoding, features (cached Lite0 vectors count the seconds they took), fit and predict.
    """
    t0, feature_s = time.perf_counter(), 0.0
    (pool, y_pool), (held, y_held) = class_files(set_dir / "pool"), class_files(set_dir / "heldout")
    if kind == "pixels":
        x_pool, x_held = pixel_features(pool), pixel_features(held)
    else:
        t1 = time.perf_counter()
        int8 = pool if kind == "probe_int8" else None  # calibrated on pool images only, as graft on its own
        cache = set_dir / ("lite0_int8_features.npz" if int8 else "lite0_features.npz")
        x, feature_s = lite0_features(pool + held, cache, int8_calibration=int8)
        t0 += time.perf_counter() - t1  # replaced by the recorded compute seconds
        x_pool, x_held = x[: len(pool)], x[len(pool) :]
    note = ""
    if kind == "probe_trainval":
        keep = graft_trainval(set_dir, seed)
        if keep is None:
            return {"status": "failed at ingest (see `graft ingest` in runs/probe_trainval)"}
        rel = [p.relative_to(set_dir / "pool").as_posix() for p in pool]
        rows = np.array([r in keep for r in rel])
        x_pool, y_pool, note = x_pool[rows], y_pool[rows], f"{int(rows.sum())} of {len(rel)} pool images; "
    model, c = fit_probe(x_pool, y_pool, seed)
    pred = model.predict(x_held)
    kept = [{"path": str(h), "best_guess": g} for h, g in zip(held, pred, strict=True)]  # like graft's rows' ones,
    write_csv_rows(set_dir / "runs" / kind / "heldout_preds.csv", kept)  # for the targets' paired comparisons
    row = {
        **score(y_held, pred, seed),
        "wall_s": time.perf_counter() - t0 + feature_s,
        "note": f"{note}C={c:g}",
        "C": c,  # the int8 CV target line fits its probes at this C
    }
    if kind in ("probe", "probe_int8"):  # how much the probe itself moves with the CV folds choosing its C (not timed)
        others = [fit_probe(x_pool, y_pool, seed + k)[0].predict(x_held) for k in range(1, PROBE_SEEDS)]
        f1s = [macro_f1(y_held, p) for p in others]
        row["note"] += f"; macro-F1 with CV seeds +1..+{PROBE_SEEDS - 1}: " + " ".join(f"{f:.3f}" for f in f1s)
    return row


def graft_trainval(set_dir: Path, seed: int) -> set[str] | None:
    """The pool paths (relative, posix) that ``graft ingest`` puts in train or val with the rows' params; None if
    ingest failed."""
    import pandas as pd

    work, _ = project("probe_trainval", set_dir, seed)
    if run_cmd([sys.executable, "-m", "graft.cli", "ingest", "--params", "params.yaml"], work, None).returncode != 0:
        return None
    manifest = pd.read_parquet(work / "data" / "manifest.parquet")
    return set(manifest.loc[manifest["split"].isin(["train", "val"]), "path"])


def run_cmd(cmd: list[str], cwd: Path, timeout: float | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")[:160]


def project(mode: str, set_dir: Path, seed: int, auto_budget: float | None = None) -> tuple[Path, dict]:
    """A fresh graft project for one row (``<set>/runs/<mode>``): params.yaml's defaults on the pool, the row's
    mode and seed (and ``auto_budget``, ``--auto-budget-minutes``: the auto rows' ``train.budget_minutes``);
    returns its folder and params."""
    work = set_dir / "runs" / mode
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["seed"] = seed
    raw["data"]["root"] = str((set_dir / "pool").resolve())
    raw["train"]["mode"] = {"head_int8": "head", "auto_all": "auto", "probe_trainval": "auto"}.get(mode, mode)
    if mode == "auto_all":
        raw["train"]["refit"] = "all"
    if mode == "head_int8":
        raw["featurize"]["precision"] = "int8"
    if raw["train"]["mode"] == "auto" and auto_budget is not None:
        raw["train"]["budget_minutes"] = auto_budget
    write_text(work / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
    return work, raw


def graft_row(mode: str, set_dir: Path, seed: int, timeout: float | None, auto_budget: float | None = None) -> dict:
    """Run graft's stages on the pool in a fresh project, then score its ONNX model on the held-out folder."""
    work, raw = project(mode, set_dir, seed, auto_budget)
    from graft.params import load_params

    try:
        load_params(work / "params.yaml")
    except GraftError as exc:
        if "train.mode" in str(exc):
            return {"status": "n/a (mode not available)", "note": str(exc)}
        raise
    stage_s: dict[str, float] = {}
    t0, stage = time.perf_counter(), STAGES[0]
    try:
        for stage in STAGES:
            ts = time.perf_counter()
            left = None if timeout is None else max(1.0, timeout - (ts - t0))
            done = run_cmd([sys.executable, "-m", "graft.cli", stage, "--params", "params.yaml"], work, left)
            stage_s[stage] = round(time.perf_counter() - ts, 1)
            if done.returncode != 0:
                return {"status": f"failed at {stage}: {_last_line(done.stderr)}", "stage_s": stage_s}
        ts = time.perf_counter()
        done = run_cmd(
            [
                sys.executable,
                "-m",
                "graft.cli",
                "predict",
                str((set_dir / "heldout").resolve()),
                "--model",
                "models/model.onnx",
                "--out",
                "heldout_preds.csv",
            ],
            work,
            None,
        )
        stage_s["predict"] = round(time.perf_counter() - ts, 1)
        if done.returncode != 0:
            return {"status": f"failed at predict: {_last_line(done.stderr)}", "stage_s": stage_s}
    except subprocess.TimeoutExpired:
        return {"status": f"stopped at {stage}: over the time budget", "stage_s": stage_s}
    with open(work / "heldout_preds.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    y_true = np.array([Path(r["path"]).parent.name for r in rows])
    y_pred = np.array([r["best_guess"] or "" for r in rows])  # the class it would answer; "unknown" aside
    train = (
        json.loads((work / "metrics" / "train.json").read_text()) if (work / "metrics" / "train.json").is_file() else {}
    )
    shown = (
        ("mode", "strategy", "image_size", "epochs")
        if train.get("mode") != raw["train"]["mode"]
        else ("strategy", "image_size", "epochs")
    )
    note = ", ".join(
        [f"{k}={train[k]}" for k in shown if k in train]
        + [f"{k} {stage_s[k]:.0f}s" for k in ("featurize", "train", "export")]
    )
    return {
        **score(y_true, y_pred, seed),
        "wall_s": time.perf_counter() - t0,
        "stage_s": stage_s,
        "note": note,
        **evaluation_extras(work),
    }


def evaluation_extras(work: Path) -> dict:
    """What graft's own evaluate measured on its test split: calibration, the "unknown" scores, and (auto)
    the leaderboard. These are graft's figures on its internal test split, not on ``heldout/``."""
    extras: dict = {}
    path = work / "metrics" / "evaluation.json"
    if path.is_file():
        ev = json.loads(path.read_text())
        extras["calibration"] = ev.get("calibration", {})
        loco = ev.get("unknown", {}).get("leave_one_class_out", {})
        photos = ev.get("unknown", {}).get("out_of_domain_photos", {})
        extras["unknown"] = (
            {k: v for k, v in loco.items() if k.startswith(("auroc_", "rejected"))}
            | ({"photos_rejected": photos["rejected"]} if "rejected" in photos else {})
            | {f"photos_rejected_{k}": v for k, v in photos.get("rejected_by_score", {}).items()}
        )
    board = work / "metrics" / "leaderboard.csv"
    if board.is_file():
        with open(board, newline="", encoding="utf-8") as fh:
            extras["leaderboard"] = [
                {k: r[k] for k in ("candidate", "score", "se", "chosen", "note") if k in r} for r in csv.DictReader(fh)
            ]
    return extras
