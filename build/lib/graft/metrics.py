"""Classification metrics shared by evaluation, the retrain gate and model selection."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width bins."""
    conf, pred = proba.max(1), proba.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: list[str], bins: int = 15) -> dict:
    """Accuracy, macro-F1, balanced accuracy, ECE and per-class precision/recall/F1.

    Macro-F1 averages over the classes that occur in the labels or the predictions: a class with no
    test image that is never predicted has no F1 (not 0), so a perfect model on a small test split
    scores 1, not the share of classes that happened to have a test image.
    """
    pred = proba.argmax(1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    seen = np.union1d(y, pred)
    return {
        "accuracy": round(float(accuracy_score(y, pred)), 4),
        "macro_f1": round(float(f1_score(y, pred, labels=seen, average="macro", zero_division=0)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
        "ece": round(expected_calibration_error(y, proba, bins), 4),
        "n": int(len(y)),
        "per_class": {
            c: {
                "precision": round(float(p[i]), 4),
                "recall": round(float(r[i]), 4),
                "f1": round(float(f[i]), 4),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
    }
