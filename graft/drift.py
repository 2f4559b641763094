"""Drift of a new batch of images against the champion's data: features, predicted class mix, unknown rate.

* **Feature drift**: a domain classifier. Logistic regression learns to tell the champion's images from
  the new ones on their cached features; its cross-validated AUROC is the score (0.5: indistinguishable,
  1.0: a different domain) and ``sklearn.model_selection.permutation_test_score`` gives the p-value
  (the same score with the old/new labels shuffled). Chosen over MMD because the score reads directly,
  it needs no kernel bandwidth, it costs linear time in the images, and scikit-learn does the test
  exactly (an MMD permutation test would be hand-written here). The features are first reduced by a
  PCA fitted on both sets together: PCA never sees which set a row is from, so it commutes with the
  shuffling and the test stays exact, and the small classifier makes 200 x 5 fits take seconds.
* **Class mix**: the champion's predicted classes on the new images against the label mix it was
  trained on: total variation distance and a chi-square test of homogeneity (``scipy.stats``).
* **Unknown rate**: the share of new images the champion answers "unknown", when its export stores an
  unknown score and threshold (:data:`UNKNOWN_KEY`); otherwise null.

``retrain.drift_alert`` is the p-value at or below which the feature drift marks a retrain run. One
exact test, so an ordinary batch raises a false alarm with probability ``drift_alert``. (A pure
change of class mix shows up here too: the classes' features differ.)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, permutation_test_score

from graft.cache import load_feature_table, select_columns, tap_columns
from graft.history import DRIFT_SCHEMA
from graft.params import Params

# Hook for the exported "unknown" answer: the ONNX metadata key of the threshold; the score is the graph's
# output other than "probabilities", and a score below the threshold means "unknown".
UNKNOWN_KEY = "graft.unknown"  # JSON {"score", "threshold", "accept_rate"} in the exported model's metadata
MAX_ROWS = 1000  # per side: a random sample beyond this (the test's power is ample, the cost stays bounded)
COMPONENTS = 16  # PCA components the domain classifier sees


@dataclass(frozen=True)
class FeatureDrift:
    """Domain-classifier drift: cross-validated AUROC, its permutation p-value, and the rows compared."""

    auroc: float
    p_value: float
    n_reference: int
    n_new: int


def permutations_for(alpha: float) -> int:
    """Enough permutations that p can fall to half of ``alpha`` (p >= 1 / (n + 1)); at least 199."""
    return max(199, math.ceil(2 / alpha) - 1)


def feature_drift(
    reference: np.ndarray, new: np.ndarray, n_permutations: int = 199, seed: int = 0
) -> FeatureDrift | None:
    """How well a classifier tells ``new`` rows from ``reference`` rows; None when either has under 2 rows."""
    rng = np.random.default_rng(seed)
    reference, new = (
        x[rng.choice(len(x), MAX_ROWS, replace=False)] if len(x) > MAX_ROWS else x for x in (reference, new)
    )
    if min(len(reference), len(new)) < 2:
        return None
    X = np.vstack([reference, new]).astype(np.float64)
    side = np.r_[np.zeros(len(reference), np.int64), np.ones(len(new), np.int64)]
    Z = PCA(min(COMPONENTS, X.shape[0] - 1, X.shape[1]), whiten=True, random_state=seed).fit_transform(X)
    folds = StratifiedKFold(min(5, len(reference), len(new)), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        auroc, _, p = permutation_test_score(
            LogisticRegression(max_iter=1000),
            Z,
            side,
            cv=folds,
            scoring="roc_auc",
            n_permutations=n_permutations,
            random_state=seed,
            n_jobs=1,
        )
    return FeatureDrift(float(auroc), float(p), len(reference), len(new))


def class_mix_shift(reference_counts: np.ndarray, new_counts: np.ndarray) -> tuple[float, float]:
    """Total variation distance between two class-count vectors, and the chi-square homogeneity p-value."""
    ref, new = np.asarray(reference_counts, np.float64), np.asarray(new_counts, np.float64)
    tvd = 0.5 * float(np.abs(ref / ref.sum() - new / new.sum()).sum())
    seen = (ref + new) > 0  # a class neither side has carries no information (and a zero expected count)
    if seen.sum() < 2:
        return tvd, 1.0
    return tvd, float(chi2_contingency(np.vstack([ref[seen], new[seen]])).pvalue)


def unknown_rate(scores: np.ndarray | None, threshold: float | None) -> float | None:
    """Share of scores below the model's unknown threshold; None when the model has no unknown answer."""
    if scores is None or threshold is None or not len(scores):
        return None
    return float(np.mean(np.asarray(scores) < threshold))


def champion_outputs(
    onnx_path: Path, paths: list[Path], batch_size: int = 64
) -> tuple[np.ndarray, float | None, list[str]]:
    """The champion's probabilities on ``paths``, its unknown rate there (None without the hook), its classes."""
    from graft.images import load_batch
    from graft.predict import OnnxClassifier

    model = OnnxClassifier(onnx_path)
    names = [o.name for o in model.session.get_outputs()]
    score_name = next((n for n in names if n != "probabilities"), None)
    threshold = json.loads(model.metadata.get(UNKNOWN_KEY) or "{}").get("threshold")
    wanted = ["probabilities"] + ([score_name] if score_name and threshold is not None else [])
    proba, scores = [], []
    for i in range(0, len(paths), batch_size):
        out = model.session.run(wanted, {"image": load_batch(paths[i : i + batch_size], model.preprocess)})
        proba.append(out[0])
        scores.append(np.ravel(out[1]) if len(out) > 1 else np.zeros(0))
    p = np.concatenate(proba) if proba else np.zeros((0, len(model.classes)), np.float32)
    s = np.concatenate(scores) if len(wanted) > 1 and scores else None
    return p, unknown_rate(s, None if threshold is None else float(threshold)), model.classes


def batch_drift(params: Params, champion: dict | None, manifest: pd.DataFrame) -> dict:
    """The drift fields of a retrain run (:data:`DRIFT_SCHEMA`) for the images new since ``champion``.

    Args:
        params: run params (``featurize.out`` holds every current image's features, ``retrain.drift_alert``).
        champion: :func:`graft.tasks.retrain.load_champion`'s dict (its ``manifest`` and ``dir``); None
            before the first promotion, when there is nothing to drift from (all fields null).
        manifest: the freshly ingested manifest.
    """
    empty = dict.fromkeys(DRIFT_SCHEMA.names)
    if champion is None:
        return empty
    old = champion["manifest"]
    added = manifest[~manifest["sha256"].isin(set(old["sha256"]))].drop_duplicates("sha256")
    if added.empty:
        return {**empty, "drift_new_images": 0}
    feats, meta = load_feature_table(params.featurize.out)
    cols = tap_columns(meta, ("last",))
    ref_shas = [s for s in old["sha256"].drop_duplicates() if s in feats]  # removed images have no features now
    reference = select_columns(np.stack([feats[s] for s in ref_shas]), cols) if ref_shas else np.zeros((0, 1))
    new = select_columns(np.stack([feats[s] for s in added["sha256"]]), cols)
    alpha = params.retrain.drift_alert
    fd = feature_drift(reference, new, permutations_for(alpha), seed=params.seed)
    sample = added.sample(min(len(added), MAX_ROWS), random_state=params.seed)  # a forward pass per image: bounded
    proba, unknown, classes = champion_outputs(
        Path(champion["dir"]) / "model.onnx", [Path(params.data.root) / p for p in sample["path"]]
    )
    trained = old[old["split"] == "train"]["label"].value_counts().reindex(classes, fill_value=0).to_numpy()
    tvd, mix_p = class_mix_shift(trained, np.bincount(proba.argmax(1), minlength=len(classes)))
    return {
        "drift_new_images": len(added),
        "drift_auroc": fd.auroc if fd else None,
        "drift_p_value": fd.p_value if fd else None,
        "class_mix_tvd": tvd,
        "class_mix_p_value": mix_p,
        "unknown_rate": unknown,
        "drift_alert": (fd.p_value <= alpha) if fd else None,
    }


def drift_markdown(row: dict) -> str:
    """The retrain artifact's Drift paragraph ('' when the run compared no new images)."""
    if row.get("drift_new_images") is None:
        return ""
    if not row["drift_new_images"]:
        return "Drift: no new images in this run.\n"
    feature = (
        f"domain-classifier AUROC **{row['drift_auroc']:.3f}** (permutation p = {row['drift_p_value']:.4f})"
        if row.get("drift_auroc") is not None
        else "feature drift not tested (fewer than 2 images on one side)"
    )
    unknown = "n/a (no unknown threshold)" if row.get("unknown_rate") is None else f"{row['unknown_rate']:.1%}"
    alert = "**DRIFT ALERT** (p <= retrain.drift_alert)" if row.get("drift_alert") else "No drift alert"
    return (
        f"Drift of the {row['drift_new_images']} new image(s) against the champion's data: {feature}; "
        f"predicted class mix vs the training labels: TVD {row['class_mix_tvd']:.3f} "
        f"(chi-square p = {row['class_mix_p_value']:.4f}); unknown rate {unknown}. {alert}.\n"
    )
