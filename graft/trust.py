"""Probabilities a user can trust: temperature scaling, an in-distribution score and its threshold.

Both are fitted on held-out predictions of the trained model (out-of-fold logits for auto's feature
candidates, the val split otherwise) and travel inside the model file and the exported graph, so every
consumer, ``graft predict`` or a plain onnxruntime session, gets calibrated probabilities and the score.

The score is the energy score (Liu et al. 2020), ``T * logsumexp(logits / T)``: higher means more like
the training classes. It needs nothing but the logits, so it works for every kind of model graft ships
(the raw-pixel model included); evaluate measures it against the max-softmax probability by
leave-one-class-out AUROC, and the report shows both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax
from sklearn.metrics import roc_auc_score

from graft import GraftError
from graft.params import Params

SCORES = ("energy", "msp")  # the in-distribution scores evaluate compares; the graph ships "energy"


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    return float(-log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the NLL of held-out logits (Guo et al. 2017); 1 without data."""
    if len(y) < 2:
        return 1.0
    res = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))


def in_distribution_score(logits: np.ndarray, temperature: float = 1.0, kind: str = "energy") -> np.ndarray:
    """Higher = more like the training data: the energy score, or the max softmax probability."""
    z = np.asarray(logits, np.float64) / temperature
    if kind == "msp":
        return softmax(z, axis=1).max(axis=1)
    return temperature * logsumexp(z, axis=1)


def threshold_for(scores: np.ndarray, accept_rate: float) -> float:
    """The score below which an image is answered "unknown": ``accept_rate`` of in-distribution images pass."""
    return float(np.quantile(scores, 1.0 - accept_rate)) if len(scores) else float("-inf")


def calibrate(logits: np.ndarray, y: np.ndarray, accept_rate: float, kind: str = "energy") -> dict:
    """Temperature and unknown threshold from held-out logits of in-distribution images, for the model file."""
    t = fit_temperature(logits, y)
    scores = in_distribution_score(logits, t, kind)
    return {
        "temperature": t,
        "n": int(len(y)),
        "nll_before": nll(logits, y) if len(y) else None,
        "nll_after": nll(logits, y, t) if len(y) else None,
        "unknown": {"score": kind, "threshold": threshold_for(scores, accept_rate), "accept_rate": accept_rate},
    }


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float | None:
    """How well the score ranks in-distribution above out-of-distribution images (0.5 = chance)."""
    if not len(id_scores) or not len(ood_scores):
        return None
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def reliability_table(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    conf, correct = proba.max(1), proba.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "bin": b,
            "confidence": float(conf[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def leave_one_class_out(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    kind: str,
    settings: dict,
    accept_rate: float,
    kind_score: str = "energy",
) -> dict:
    """For each class k: fit the model's head without class k (same kind and settings, on train+val features),
    calibrate it on its own out-of-fold logits, and score how well the test images of class k are rejected:
    AUROC of each score (test images of the other classes vs class k) and the rejection rate at the threshold."""
    from graft.auto import fit_features
    from graft.heads import head_logits
    from graft.select import cv_splits

    rows: dict[str, list[float]] = {
        key: [] for key in (*(f"auroc_{s}" for s in (*SCORES, "distance")), "rejected_at_threshold")
    }
    classes = np.unique(y)
    if len(classes) < 3:
        return {"classes": int(len(classes)), "note": "needs at least 3 classes"}
    for k in classes:
        keep = y != k
        labels = np.searchsorted(np.setdiff1d(classes, [k]), y[keep])
        logits_oof = np.zeros((int(keep.sum()), len(classes) - 1))
        for tr, va in cv_splits(labels, 3):
            logits_oof[va] = head_logits(fit_features(kind, x[keep][tr], labels[tr], settings), x[keep][va])
        cal = calibrate(logits_oof, labels, accept_rate, kind_score)
        z = head_logits(fit_features(kind, x[keep], labels, settings), x_test)
        t, inside = cal["temperature"], y_test != k
        for s in SCORES:
            score = in_distribution_score(z, t, s)
            rows[f"auroc_{s}"].append(auroc(score[inside], score[~inside]) or float("nan"))
        d = distance_score(x[keep], labels, x_test)  # measured beside the logit scores (not in the graph)
        rows["auroc_distance"].append(auroc(d[inside], d[~inside]) or float("nan"))
        shipped = in_distribution_score(z[~inside], t, kind_score)
        rejected = (shipped < cal["unknown"]["threshold"]).mean() if shipped.size else np.nan  # class not in test
        rows["rejected_at_threshold"].append(float(rejected))
    return {k: round(float(np.nanmean(v)), 4) for k, v in rows.items()} | {"classes": int(len(classes))}


def distance_score(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Minus the mean squared distance to the nearest class mean, in features standardised on the training
    images (a diagonal Mahalanobis distance): higher = closer to some training class."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    means = np.stack([((x_train[y_train == c] - mean) / std).mean(0) for c in np.unique(y_train)])
    z = (x - mean) / std
    d2 = (z**2).sum(1)[:, None] - 2 * z @ means.T + (means**2).sum(1)[None, :]
    return -d2.min(1) / x.shape[1]


def photos() -> list:
    """Real photos bundled with scikit-image (out of domain for most graft data sets); [] without it."""
    try:
        from skimage import data
    except ImportError:
        return []
    from PIL import Image

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")
    out = []
    for name in names:
        fn = getattr(data, name, None)
        if fn is not None:
            try:
                out.append(Image.fromarray(fn()).convert("RGB"))
            except Exception:  # noqa: BLE001 - a photo the installed version cannot load is simply not used
                continue
    return out


def trust_metrics(logits: np.ndarray, y: np.ndarray, calibration: dict, bins: int) -> dict:
    """ECE and NLL on the test split before and after temperature scaling; how many test images the
    unknown threshold rejects (about 1 - accept_rate if the threshold transfers)."""
    from graft.metrics import expected_calibration_error

    t = float(calibration.get("temperature", 1.0))
    before, after = softmax(logits, axis=1), softmax(logits / t, axis=1)
    unknown = calibration.get("unknown") or {}
    out = {
        "temperature": round(t, 4),
        "ece_before": round(expected_calibration_error(y, before, bins), 4),
        "ece_after": round(expected_calibration_error(y, after, bins), 4),
        "nll_before": round(nll(logits, y), 4),
        "nll_after": round(nll(logits, y, t), 4),
    }
    if unknown.get("threshold") is not None:
        scores = in_distribution_score(logits, t, unknown.get("score", "energy"))
        out["unknown_threshold"] = round(float(unknown["threshold"]), 4)
        out["test_rejected"] = round(float((scores < unknown["threshold"]).mean()), 4)
    return out


def unknown_report(
    params: Params,
    payload: dict,
    manifest: pd.DataFrame,
    classes: list[str],
    feats: dict,
    meta: dict,
    test_logits: np.ndarray | None = None,
) -> dict:
    """The "unknown" answer measured two ways: leave-one-class-out on the cached features (the model's own head
    kind and settings when it is a feature candidate of this backbone; a logistic-regression probe on the
    last-layer features as a proxy otherwise, and it says so) and real out-of-domain photos through the model."""
    from graft.auto import FEATURE_CANDIDATES
    from graft.cache import select_columns, tap_columns
    from graft.dataset import split_arrays

    out: dict = {}
    cand = str(payload.get("candidate"))
    own = cand in FEATURE_CANDIDATES and payload["backbone"]["name"] == meta.get("graft.backbone")
    taps, kind = FEATURE_CANDIDATES[cand] if own else (("last",), "linear")
    settings = payload.get("settings", {}) if own else {"C": 1.0}
    if feats:
        cols = tap_columns(meta, taps)
        tr = [split_arrays(manifest, feats, classes, s) for s in ("train", "val")]
        x = select_columns(np.concatenate([a for a, _ in tr]), cols)
        y = np.concatenate([b for _, b in tr])
        x_te, y_te = split_arrays(manifest, feats, classes, "test")
        try:
            loco = leave_one_class_out(
                x,
                y,
                select_columns(x_te, cols),
                y_te,
                kind,
                settings,
                params.predict.accept_rate,
                params.predict.unknown_score,
            )
        except GraftError as exc:  # too few images per class to cross-validate: say so, evaluate goes on
            loco = {"note": f"skipped: {exc}"}
        out["leave_one_class_out"] = loco | {"model": cand if own else "proxy: logreg probe on last-layer features"}
    images = photos()
    unknown = (payload.get("calibration") or {}).get("unknown", {})
    threshold = unknown.get("threshold")
    if images and threshold is not None:
        import torch

        from graft.images import preprocess
        from graft.model import classifier_from_payload

        model, bb = classifier_from_payload(payload)
        x = np.stack([preprocess(im, bb.preprocess) for im in images])
        with torch.no_grad():
            z = model.logits(torch.from_numpy(x)).numpy()
        scores = in_distribution_score(z, model.temperature, unknown.get("score", "energy"))
        out["out_of_domain_photos"] = {
            "images": len(images),
            "rejected": round(float((scores < threshold).mean()), 4),
            "source": "scikit-image bundled photos",
        }
        if test_logits is not None and len(test_logits):  # every score at its own threshold on the test split

            def rejected(kind: str) -> float:
                t = model.temperature
                cut = threshold_for(in_distribution_score(test_logits, t, kind), params.predict.accept_rate)
                return round(float((in_distribution_score(z, t, kind) < cut).mean()), 4)

            out["out_of_domain_photos"]["rejected_by_score"] = {s: rejected(s) for s in SCORES}
    return out
