"""Transfer benchmark: raw pixels, a scikit-learn probe and graft's modes, scored on held-out real images.

    python bench/transfer.py                                    # all sets, all rows (fine-tune rows take minutes)
    python bench/transfer.py --sets digits,icons --modes pixels,probe,head
    python bench/transfer.py --budget-minutes 30 --out cache/bench

Builds the sets with bench/datasets.py (see its docstring for the apt-get line). Per set, each row
learns from ``pool/`` only and is scored once on ``heldout/``:
  pixels    16x16 grey pixels, StandardScaler + LogisticRegression, C by 5-fold CV on the pool
  probe     the same scikit-learn probe on EfficientNet-Lite0 features from graft's own backbone
  probe_trainval
            that probe fit on graft's own train+val images only (the split ``graft ingest`` makes of the pool):
            the images the default ``auto`` (``refit: trainval``) learns from, so the like-for-like reference
  probe_int8
            that probe on the features of graft's int8 backbone (see ``head_int8`` below)
  head, finetune, auto, head_int8
            graft's CLI stages (ingest, featurize, train, evaluate, export) in a fresh project per row
            (``<out>/<set>/runs/<mode>``, its own feature cache, so wall times are comparable), then
            ``graft predict`` on the held-out folder: the score reads only models/model.onnx.
``auto_all`` is auto with ``train.refit: all``: after the test metrics, the exported model is refit on every pool
image, as the scikit-learn rows are (the default ``trainval`` never trains on graft's own test split, 15 %).
``head_int8`` is graft's head on features from the int8-quantized backbone (``featurize.precision: int8``);
``probe_int8`` is the probe row on that backbone's features (graft's own int8 engine, calibrated on pool images as
``graft featurize`` calibrates on its own): a convex, deterministic fit, so its difference to ``probe`` is what
the int8 features change, without the head's training noise.
A mode that params validation rejects (``auto`` until it lands) is reported as n/a. Prints one table
per set and the targets; writes every row to ``<out>/transfer.json`` (merged by set).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft import GraftError  # noqa: E402 - after sys.path points at this checkout
from graft.atomic import write_json, write_text, write_with  # noqa: E402
from graft.images import load_rgb, preprocess  # noqa: E402


def _bench_datasets():
    """bench/datasets.py, loaded by path: a plain ``import datasets`` could pick up Hugging Face's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("graft_bench_datasets", REPO / "bench" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DATASETS = _bench_datasets()
BUILDERS, build_set, check_sources = _DATASETS.BUILDERS, _DATASETS.build_set, _DATASETS.check_sources

ROWS = ("pixels", "probe", "probe_trainval", "probe_int8", "head", "head_int8", "finetune", "auto", "auto_all")
STAGES = ("ingest", "featurize", "train", "evaluate", "export")
CS = np.logspace(-4, 2, 7)  # C grid for both scikit-learn rows
PROBE_SEEDS = 5  # the probe row also reports its held-out score under 4 other CV fold seeds (its own noise)
PIXELS = 16  # graft's evaluate baseline uses the same 16x16 grey pixels


def class_files(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The images under ``folder/<class>/`` in a stable order, with their class names."""
    paths = sorted(p for p in folder.glob("*/*") if p.is_file() and not p.name.startswith("."))
    return paths, np.array([p.parent.name for p in paths])


def pixel_features(paths: list[Path]) -> np.ndarray:
    """16x16 grey pixels in [0, 1], decoded by graft (alpha over white), resampled as graft's baseline does."""
    out = np.empty((len(paths), PIXELS * PIXELS), np.float32)
    for i, p in enumerate(paths):
        img = load_rgb(p, min_side=PIXELS)[0].convert("L").resize((PIXELS, PIXELS), resample=3, reducing_gap=2.0)
        out[i] = np.asarray(img, np.float32).ravel() / 255.0
    return out


def lite0_features(
    paths: list[Path], cache: Path, batch: int = 32, int8_calibration: list[Path] | None = None
) -> tuple[np.ndarray, float]:
    """1280-d EfficientNet-Lite0 features from graft's backbone (torch, eval mode, channels_last); with
    ``int8_calibration``, from graft's int8 onnxruntime engine (``featurize.precision: int8``: the same
    :func:`graft.engine.make_engine`) calibrated on those images, its graph kept next to ``cache``.

    Vectors are kept in ``cache`` (npz keyed by file sha256 and the backbone fingerprint, for int8 also the
    calibration images') with the seconds each one took, so a rerun is quick and still reports what computing
    them cost.

    Returns:
        The features, and the seconds spent computing them (now or when they were cached).
    """
    import hashlib

    import torch

    from graft.backbones import build_backbone, describe_backbone, fingerprint_of
    from graft.cache import preprocess_of
    from graft.quantize import with_precision

    description = describe_backbone("efficientnet_lite0")  # the model is built only if vectors are missing
    pp = preprocess_of(description)
    keys = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    fingerprint = fingerprint_of(description)
    if int8_calibration is not None:
        key_of = dict(zip(map(str, paths), keys, strict=True))
        calib = sorted(
            (key_of.get(str(p)) or hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in int8_calibration
        )
        description = with_precision(description, "int8")
        calibrated_on = hashlib.sha256(" ".join(k for k, _ in calib).encode()).hexdigest()
        fingerprint = f"{fingerprint_of(description)}:{calibrated_on}"
    known: dict[str, tuple[np.ndarray, float]] = {}
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["fingerprint"]) == fingerprint:
                known = {k: (v, float(s)) for k, v, s in zip(z["keys"], z["features"], z["seconds"], strict=True)}
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo and int8_calibration is not None:
        from graft.engine import make_engine
        from graft.params import FeaturizeParams

        graph_dir = cache.with_suffix(".graph")
        shutil.rmtree(graph_dir, ignore_errors=True)  # calibrated on this pool, not an earlier one
        graph_dir.mkdir(parents=True)
        run: Callable[[np.ndarray], np.ndarray] = make_engine(
            FeaturizeParams(precision="int8"),
            graph_dir,
            description,
            lambda: build_backbone("efficientnet_lite0"),
            calib,
        )
    elif todo:
        model = build_backbone("efficientnet_lite0").model.to(memory_format=torch.channels_last)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x).to(memory_format=torch.channels_last)).numpy()

    for i in range(0, len(todo), batch):
        t0 = time.perf_counter()
        chunk = todo[i : i + batch]
        x = np.stack([preprocess(load_rgb(paths[j], min_side=pp.resize)[0], pp) for j in chunk])
        feats = run(x)
        per = (time.perf_counter() - t0) / len(chunk)
        known.update({keys[j]: (f, per) for j, f in zip(chunk, feats, strict=True)})
    if todo:
        ks = sorted(known)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a path
                np.savez(
                    fh,
                    fingerprint=fingerprint,
                    keys=np.array(ks),
                    features=np.stack([known[k][0] for k in ks]),
                    seconds=np.array([known[k][1] for k in ks]),
                )

        write_with(cache, save)
    return np.stack([known[k][0] for k in keys]), sum(known[k][1] for k in keys)


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int):
    """StandardScaler + LogisticRegression with C chosen by stratified 5-fold CV; returns (model, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    search = GridSearchCV(pipe, {"logisticregression__C": CS}, cv=StratifiedKFold(5, shuffle=True, random_state=seed))
    with threadpool_limits(1, user_api="blas"):  # small problems: threaded BLAS on a busy 2-core box is ~50x slower
        search.fit(x, y)
    return search.best_estimator_, float(search.best_params_["logisticregression__C"])


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: list | None = None) -> float:
    """Macro-F1 over ``labels`` (default: the true classes), a class never predicted scoring 0: an unreadable
    file's prediction ("") counts as wrong, not as a class."""
    from sklearn.metrics import f1_score

    labels = sorted(set(y_true)) if labels is None else labels
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def point_score(y_true: np.ndarray, y_pred: np.ndarray, metric: str) -> float:
    """``metric`` (``macro_f1`` or ``accuracy``) as the rows report it."""
    return macro_f1(y_true, y_pred) if metric == "macro_f1" else float(np.mean(y_true == y_pred))


def score(y_true: np.ndarray, y_pred: np.ndarray, seed: int) -> dict:
    """Accuracy with a Wilson 95% interval, macro-F1 with a bootstrap 95% interval (1,000 resamples)."""
    from scipy.stats import binomtest, bootstrap

    n, k = len(y_true), int((y_true == y_pred).sum())
    ci = binomtest(k, n).proportion_ci(method="wilson")
    labels = sorted(set(y_true))

    def f1(t: np.ndarray, p: np.ndarray) -> float:  # a resample may miss a class: score on the full set's classes
        return macro_f1(t, p, labels)

    boot = bootstrap(
        (y_true, y_pred), f1, paired=True, vectorized=False, n_resamples=1000, method="percentile", random_state=seed
    ).confidence_interval
    return {
        "accuracy": k / n,
        "accuracy_ci": [ci.low, ci.high],
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_f1_ci": [float(boot.low), float(boot.high)],
        "n": n,
    }


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
    row = {**score(y_held, pred, seed), "wall_s": time.perf_counter() - t0 + feature_s, "note": f"{note}C={c:g}"}
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
    if _run([sys.executable, "-m", "graft.cli", "ingest", "--params", "params.yaml"], work, None).returncode != 0:
        return None
    manifest = pd.read_parquet(work / "data" / "manifest.parquet")
    return set(manifest.loc[manifest["split"].isin(["train", "val"]), "path"])


def _run(cmd: list[str], cwd: Path, timeout: float | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")[:160]


AUTO_BUDGET_MINUTES: float | None = None  # --auto-budget-minutes: train.budget_minutes of the auto rows


def project(mode: str, set_dir: Path, seed: int) -> tuple[Path, dict]:
    """A fresh graft project for one row (``<set>/runs/<mode>``): params.yaml's defaults on the pool, the row's
    mode and seed; returns its folder and params."""
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
    if raw["train"]["mode"] == "auto" and AUTO_BUDGET_MINUTES is not None:
        raw["train"]["budget_minutes"] = AUTO_BUDGET_MINUTES
    write_text(work / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
    return work, raw


def graft_row(mode: str, set_dir: Path, seed: int, timeout: float | None) -> dict:
    """Run graft's stages on the pool in a fresh project, then score its ONNX model on the held-out folder."""
    work, raw = project(mode, set_dir, seed)
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
            done = _run([sys.executable, "-m", "graft.cli", stage, "--params", "params.yaml"], work, left)
            stage_s[stage] = round(time.perf_counter() - ts, 1)
            if done.returncode != 0:
                return {"status": f"failed at {stage}: {_last_line(done.stderr)}", "stage_s": stage_s}
        ts = time.perf_counter()
        done = _run(
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


def write_csv_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys, at least one) as a CSV file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_with(path, save)


def heldout_preds(set_dir: Path, mode: str) -> dict[str, str] | None:
    """A row's held-out predictions, ``class/file`` -> predicted class, or None if the row left none."""
    path = set_dir / "runs" / mode / "heldout_preds.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        return {"/".join(Path(r["path"]).parts[-2:]): r["best_guess"] or "" for r in csv.DictReader(fh)}


def paired_note(set_dir: Path | None, a: str, b: str, metric: str, seed: int) -> str:
    """Row ``a`` minus row ``b`` on the same held-out images: the paired-bootstrap 95 % interval of the difference
    (graft's own :func:`graft.compare.compare`), McNemar's p and how many predictions agree; "" without both."""
    from graft.compare import compare

    pa, pb = (heldout_preds(set_dir, m) if set_dir else None for m in (a, b))
    if not pa or not pb or pa.keys() != pb.keys():
        return ""
    keys = sorted(pa)
    y = np.array([k.split("/")[0] for k in keys])
    r = compare(y, np.array([pa[k] for k in keys]), np.array([pb[k] for k in keys]), metric, seed=seed)
    agree = np.mean([pa[k] == pb[k] for k in keys])
    return (
        f"; paired 95% CI {100 * r['lo']:+.1f} to {100 * r['hi']:+.1f} pt, McNemar p={r['p']:.2f}, "
        f"same prediction on {100 * agree:.1f}% of {len(keys)} held-out images"
    )


HEAD_SEEDS = 8  # training seeds of the int8 head check


def int8_head_gaps(set_dir: Path, metric: str) -> np.ndarray | None:
    """Held-out ``metric`` of graft's head trained on int8 features minus trained on fp32 features, per training
    seed (the rows' ``seed`` + 0..HEAD_SEEDS-1); None unless the head, head_int8 and probe rows have run.

    Each pair is what the two rows do once: :func:`graft.heads.fit_head` (the head mode's fit, the rows'
    params) on the split and the feature table of the row's own project; the held-out images then get fp32
    features, as the exported ``model.onnx`` of both rows computes them (here the probe row's cached
    vectors). The first pair repeats the rows; the others measure the head's training noise (its early
    stopping on val loss), which one run per row cannot tell apart from what the int8 features change.
    """
    import torch

    from graft.cache import load_feature_table, select_columns, tap_columns
    from graft.dataset import read_classes, read_manifest, split_arrays
    from graft.heads import fit_head
    from graft.params import load_params

    runs, cache = [set_dir / "runs" / m for m in ("head", "head_int8")], set_dir / "lite0_features.npz"
    if not cache.is_file() or not all((w / "data" / "features.parquet").is_file() for w in runs):
        return None
    held, y_held = class_files(set_dir / "heldout")
    x_held = torch.from_numpy(lite0_features(held, cache)[0])
    scores = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train stage fits heads
    try:
        for work in runs:
            params = load_params(work / "params.yaml")
            data = work / params.data.out_dir
            manifest, classes = read_manifest(data), read_classes(data)
            feats, meta = load_feature_table(work / params.featurize.out)
            columns = tap_columns(meta, ("last",))
            x_tr, y_tr = split_arrays(manifest, feats, classes, "train")
            x_val, y_val = split_arrays(manifest, feats, classes, "val")
            x_tr, x_val = select_columns(x_tr, columns), select_columns(x_val, columns)
            row = []
            for k in range(HEAD_SEEDS):
                head, _ = fit_head(x_tr, y_tr, x_val, y_val, len(classes), params.train, params.seed + k)
                with torch.no_grad():
                    pred = np.array(classes)[head(x_held).argmax(1).numpy()]
                row.append(point_score(y_held, pred, metric))
            scores.append(row)
    finally:
        torch.set_num_threads(threads)
    return np.array(scores[1]) - np.array(scores[0])


def within_half_point(gap: float) -> str:
    """PASS when ``gap`` (a score difference) is at least -0.5 pt."""
    return "PASS" if gap >= -0.005 - 1e-12 else "FAIL"


def targets(rows: dict[str, dict], metric: str, set_dir: Path | None = None, seed: int = 0) -> dict[str, str]:
    """PASS/FAIL of auto against the best single mode (-0.5 pt), raw pixels and the probe, on ``metric``, and of
    the int8 rows against their fp32 rows; each check quotes the paired interval of the difference (from the
    rows' kept predictions in ``set_dir``), which says whether the held-out images can tell the two apart."""
    val = {k: r[metric] for k, r in rows.items() if metric in r}
    best = max((k for k in ("head", "finetune") if k in val), key=val.get, default=None)
    checks = {  # check -> (how the reference reads, the reference row, its score less any allowance)
        ">= best single - 0.5 pt": (f"{best} - 0.005", best, val[best] - 0.005 if best else None),
        ">= raw-pixel LR": ("pixels", "pixels", val.get("pixels")),
        ">= sklearn probe": ("probe", "probe", val.get("probe")),
        ">= sklearn probe on graft's train+val": ("probe_trainval", "probe_trainval", val.get("probe_trainval")),
    }
    out = {}
    for row in [r for r in ("auto", "auto_all") if r in val] or ["auto"]:
        for k, (name, ref_row, ref) in checks.items():
            if row == "auto_all" and name == "probe_trainval":
                continue  # auto_all learns from the whole pool, as the probe row does
            out[f"{row} {k}"] = (
                "n/a (row not run)"
                if ref is None or row not in val
                else ("PASS" if val[row] >= ref - 1e-12 else "FAIL")
                + f" ({row} {val[row]:.4f} vs {name} {ref:.4f}{paired_note(set_dir, row, str(ref_row), metric, seed)})"
            )
    if "head_int8" in val and "head" in val:  # issue 14: heads on int8 features within 0.5 pt of fp32's
        gap = val["head_int8"] - val["head"]
        out["head on int8 features >= head - 0.5 pt"] = within_half_point(gap) + (
            f" ({val['head_int8']:.4f} vs {val['head']:.4f}, {100 * gap:+.1f} pt"
            f"{paired_note(set_dir, 'head_int8', 'head', metric, seed)})"
        )
    gaps = int8_head_gaps(set_dir, metric) if set_dir and "head_int8" in val and "head" in val else None
    if gaps is not None:  # the same over the head's training seeds
        mean, se = float(gaps.mean()), float(gaps.std(ddof=1) / np.sqrt(len(gaps)))
        out[f"head on int8 features >= head - 0.5 pt, mean of {len(gaps)} training seeds"] = (
            within_half_point(mean)
            + f" ({100 * mean:+.2f} pt, standard error {100 * se:.2f}; per seed "
            + " ".join(f"{100 * g:+.1f}" for g in gaps)
            + ")"
        )
    if "probe_int8" in val and "probe" in val:  # the same with a convex fit: no training-seed noise
        gap = val["probe_int8"] - val["probe"]
        out["sklearn probe on int8 features >= probe - 0.5 pt"] = within_half_point(gap) + (
            f" ({val['probe_int8']:.4f} vs {val['probe']:.4f}, {100 * gap:+.1f} pt"
            f"{paired_note(set_dir, 'probe_int8', 'probe', metric, seed)})"
        )
    return out


NAMES = {
    "pixels": f"raw pixels {PIXELS}x{PIXELS} + LR",
    "probe": "sklearn probe on Lite0",
    "probe_trainval": "  same, graft's trainval",
    "probe_int8": "  same, int8 features",
    "head": "graft head",
    "head_int8": "graft head, int8 feats",
    "finetune": "graft finetune",
    "auto": "graft auto",
    "auto_all": "graft auto, refit all",
}


def format_table(name: str, result: dict) -> str:
    """One set's rows: accuracy and macro-F1 with 95% intervals, wall seconds, a note; then the targets."""
    lines = [
        f"== {name}: pool {result['pool']} images, heldout {result['heldout']} images, {result['classes']} classes",
        f"{'row':<24} {'accuracy [95% CI]':<23} {'macro-F1 [95% CI]':<23} {'wall s':>7}  note",
    ]
    for key, r in result["rows"].items():
        if "accuracy" not in r:
            lines.append(f"{NAMES[key]:<24} {r['status']}")
            continue
        acc = f"{r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]"
        f1 = f"{r['macro_f1']:.3f} [{r['macro_f1_ci'][0]:.3f}, {r['macro_f1_ci'][1]:.3f}]"
        note = (f"[earlier run {r['time']}] " if r.get("earlier") else "") + r.get("note", "")
        lines.append(f"{NAMES[key]:<24} {acc:<23} {f1:<23} {r['wall_s']:>7.1f}  {note}")
    auto = result["rows"].get("auto", {})
    lines.append(f"auto wall time: {auto['wall_s']:.1f} s" if "wall_s" in auto else "auto wall time: n/a")
    lines += [f"target ({result['target_metric']}) {k}: {v}" for k, v in result["targets"].items()]
    trust = [(k, r) for k, r in result["rows"].items() if r.get("calibration")]
    if trust:
        lines.append("graft's test split: temperature, ECE and NLL before -> after; unknown (LOCO AUROC, photos)")
        for key, r in trust:
            c, u = r["calibration"], r.get("unknown", {})
            cal = (
                f"T={c.get('temperature', 1.0):.2f} ECE {c.get('ece_before', float('nan')):.3f}->"
                f"{c.get('ece_after', float('nan')):.3f} NLL {c.get('nll_before', float('nan')):.3f}->"
                f"{c.get('nll_after', float('nan')):.3f}"
            )
            unk = " ".join(f"{k.removeprefix('auroc_')} {v:.3f}" for k, v in u.items() if k.startswith("auroc_"))
            rej = f"rejected at threshold {u['rejected_at_threshold']:.2f}" if "rejected_at_threshold" in u else ""
            pho = f"photos rejected {u['photos_rejected']:.2f}" if "photos_rejected" in u else ""
            by = [(k.removeprefix("photos_rejected_"), v) for k, v in u.items() if k.startswith("photos_rejected_")]
            pho += f" ({', '.join(f'{k} {v:.2f}' for k, v in by)} at test-split thresholds)" if by else ""
            lines.append(f"  {NAMES[key]:<22} {cal}; AUROC {unk or 'n/a'}; {rej} {pho}".rstrip())
    board = result["rows"].get("auto", {}).get("leaderboard")
    if board:
        lines.append(
            "auto leaderboard (val score +- se): "
            + "; ".join(
                f"{b['candidate']}{'*' if str(b.get('chosen')).lower() == 'true' else ''} "
                + (f"{float(b['score']):.3f}+-{float(b['se'] or 0):.3f}" if b.get("score") else (b.get("note") or "-"))
                for b in board
            )
        )
    return "\n".join(lines)


def run_set(
    name: str, out: Path, modes: list[str], seed: int, deadline: float | None, metric: str, earlier: dict | None = None
) -> dict:
    """Build the set, run the rows in ``modes``; rows of an earlier run of the same set build are kept."""
    record = build_set(name, out, seed)
    set_dir = out / name
    stamp = {
        "commit": _run(["git", "describe", "--always", "--dirty"], REPO, 30).stdout.strip(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: dict[str, dict] = {}
    if earlier and earlier.get("spec") == record["spec"]:
        rows = {k: {**r, "earlier": True} for k, r in earlier["rows"].items() if k not in modes}
    for mode in modes:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            rows[mode] = {"status": "skipped: over the time budget"}
        elif mode in ("pixels", "probe", "probe_trainval", "probe_int8"):
            rows[mode] = sklearn_row(mode, set_dir, seed)
        else:
            rows[mode] = graft_row(mode, set_dir, seed, left)
        rows[mode].update(stamp)
        print(f"  {name}/{mode}: {rows[mode].get('status') or f'{rows[mode][metric]:.4f} {metric}'}", flush=True)
    tot = {k: sum(v[k] for v in record["classes"].values()) for k in ("pool", "heldout")}
    rows = {k: rows[k] for k in ROWS if k in rows}
    return {
        **tot,
        "classes": len(record["classes"]),
        "spec": record["spec"],
        "source": record["source"],
        "installed": record["installed"],
        "rows": rows,
        "target_metric": metric,
        "targets": targets(rows, metric, set_dir, seed),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(BUILDERS), help=f"comma list of {', '.join(BUILDERS)}")
    ap.add_argument("--modes", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--out", default=str(REPO / "cache" / "bench"), help="sets, row projects and transfer.json")
    ap.add_argument(
        "--budget-minutes", type=float, default=None, help="start no row after this; stop a graft row at it"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--auto-budget-minutes", type=float, default=None, help="train.budget_minutes of the auto rows")
    ap.add_argument("--target-metric", choices=("macro_f1", "accuracy"), default="macro_f1")
    ap.add_argument("--show", action="store_true", help="print the tables of <out>/transfer.json; run nothing")
    args = ap.parse_args(argv)
    global AUTO_BUDGET_MINUTES
    AUTO_BUDGET_MINUTES = args.auto_budget_minutes
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = Path(args.out).resolve()
    deadline = None if args.budget_minutes is None else time.monotonic() + 60 * args.budget_minutes
    try:
        bad = [m for m in modes if m not in ROWS] + [s for s in sets if s not in BUILDERS]
        if bad:
            raise GraftError(f"unknown set or mode {bad[0]!r}: sets {', '.join(BUILDERS)}; modes {', '.join(ROWS)}")
        results_path = out / "transfer.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        if args.show:
            print("\n\n".join(format_table(k, v) for k, v in results.items() if k in sets))
            return 0
        check_sources(sets, out, args.seed)  # every set's Debian package, before the first set's rows run
        for name in sets:
            results[name] = run_set(name, out, modes, args.seed, deadline, args.target_metric, results.get(name))
            write_json(results_path, results)  # after each set: a later failure keeps the finished ones
            print(format_table(name, results[name]) + "\n", flush=True)
    except GraftError as exc:
        print(f"transfer: error: {exc}", file=sys.stderr)
        return 2
    print(f"rows written to {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
