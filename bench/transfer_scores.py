"""bench/transfer.py's features and scores: the held-out folders' files, raw-pixel and Lite0 feature vectors (cached
next to the set), the scikit-learn probe, and the scores with their intervals."""

from __future__ import annotations

import csv
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft.atomic import write_with  # noqa: E402 - after sys.path points at this checkout
from graft.images import load_rgb, preprocess  # noqa: E402

CS = np.logspace(-4, 2, 7)  # C grid for both scikit-learn rows
PIXELS = 16  # graft's evaluate baseline uses the same 16x16 grey pixels


def class_files(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The images under ``folder/<class>/`` in a stable order, with their class names."""
    paths = sorted(p for p in folder.glob("*/*") if p.is_file() and not p.name.startswith("."))
    return paths, np.array([p.parent.name for p in paths])


def pixel_features(paths: list[Path]) -> np.ndarray:
    """16x16 grey pixels in [0, 1], exactly what graft's evaluate baseline reads (decoded by graft, alpha over
    white): :func:`graft.tasks.evaluate.pixel_matrix`."""
    from graft.tasks.evaluate import pixel_matrix

    return pixel_matrix(paths, PIXELS)


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
