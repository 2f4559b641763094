"""Honest model-vs-model comparison on the same test images: paired bootstrap interval and McNemar test.

Two models scored on one test set are compared *paired*: every bootstrap replicate resamples image
indices once and scores both models on that same resample, so image difficulty cancels out of the
difference. The verdict comes from the 95% interval only, never from the point estimate: on a few
hundred images a 2-point gap is often noise.

Typical use::

    result = compare(y, pred_model, pred_baseline, metric="macro_f1")
    print(comparison_sentence("efficientnet_lite0 + logreg head", "the raw-pixel baseline", result))
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from graft import GraftError

METRICS = ("accuracy", "macro_f1")
_METRIC_LABEL = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
_CHUNK_CELLS = 2_000_000  # replicates x images per chunk: bounds memory for large test sets


def _check(y: np.ndarray, *preds: np.ndarray, metric: str = "accuracy") -> tuple[np.ndarray, ...]:
    if metric not in METRICS:
        raise GraftError(f"unknown comparison metric {metric!r}: use one of {', '.join(METRICS)}")
    arrays = tuple(np.asarray(a).ravel() for a in (y, *preds))
    if arrays[0].size == 0:
        raise GraftError("cannot compare models on an empty test set: the test split has no images")
    if any(a.size != arrays[0].size for a in arrays):
        raise GraftError(
            f"labels and predictions differ in length ({', '.join(str(a.size) for a in arrays)}): "
            "score both models on the same test images"
        )
    return arrays


def score(y: np.ndarray, pred: np.ndarray, metric: str = "accuracy", labels: np.ndarray | None = None) -> float:
    """One metric on the full set (scikit-learn), with the same class set the bootstrap uses."""
    y, pred = _check(y, pred, metric=metric)
    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    labels = np.unique(np.concatenate([y, pred])) if labels is None else np.asarray(labels)
    # nan: a class absent from both labels and predictions has no F1 and is left out of the mean
    return float(f1_score(y, pred, labels=labels, average="macro", zero_division=np.nan))


def _replicate_weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap replicates as multiplicity rows (how often each image was drawn), in bounded chunks."""
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        flat = (idx + n * np.arange(m)[:, None]).ravel()
        yield np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)


def _weighted_scores(w: np.ndarray, y: np.ndarray, pred: np.ndarray, metric: str, labels: np.ndarray) -> np.ndarray:
    """The metric of one model on each replicate (rows of ``w``); equals scikit-learn on the resample."""
    if metric == "accuracy":
        return w @ (y == pred) / w.sum(axis=1)
    # Per-class counts on every replicate at once: one matrix product instead of a f1_score call each.
    true = y[:, None] == labels[None, :]
    hit = pred[:, None] == labels[None, :]
    tp, fp, fn = w @ (true & hit), w @ (~true & hit), w @ (true & ~hit)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    return np.nanmean(f1, axis=1)


def bootstrap_scores(
    y: np.ndarray, pred: np.ndarray, metric: str = "macro_f1", n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """The metric of one model on ``n_boot`` bootstrap resamples of the test set (for a standard error)."""
    y, pred = _check(y, pred, metric=metric)
    labels = np.unique(np.concatenate([y, pred]))
    return np.concatenate(
        [_weighted_scores(w, y, pred, metric, labels) for w in _replicate_weights(y.size, n_boot, seed)]
    )


def paired_bootstrap(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, metric: str = "accuracy", n_boot: int = 2000, seed: int = 0
) -> dict:
    """Paired bootstrap of ``metric(a) - metric(b)`` on the same test images.

    Args:
        y: true labels.
        pred_a: predictions of model a (the candidate).
        pred_b: predictions of model b (the reference, e.g. the baseline).
        metric: ``accuracy`` or ``macro_f1``.
        n_boot: bootstrap replicates.
        seed: seed of the resampling.

    Returns:
        ``metric``, ``n`` (images), ``n_boot``, ``score_a``, ``score_b``, ``diff`` (a minus b on the full
        set) and ``lo``, ``hi``: the 95% percentile interval of the replicate differences.
    """
    y, pred_a, pred_b = _check(y, pred_a, pred_b, metric=metric)
    if n_boot < 1:
        raise GraftError(f"n_boot must be at least 1 (got {n_boot})")
    labels = np.unique(np.concatenate([y, pred_a, pred_b]))  # one class set for both models and every replicate
    diffs = np.concatenate(
        [
            _weighted_scores(w, y, pred_a, metric, labels) - _weighted_scores(w, y, pred_b, metric, labels)
            for w in _replicate_weights(y.size, n_boot, seed)
        ]
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    sa, sb = score(y, pred_a, metric, labels), score(y, pred_b, metric, labels)
    return {
        "metric": metric,
        "n": int(y.size),
        "n_boot": int(n_boot),
        "score_a": sa,
        "score_b": sb,
        "diff": sa - sb,
        "lo": float(lo),
        "hi": float(hi),
    }


def mcnemar(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact McNemar test: a two-sided binomial test on the images exactly one model gets right.

    Returns:
        ``b`` (a right, b wrong), ``c`` (a wrong, b right) and ``p`` (1.0 when there is no discordant pair).
    """
    y, pred_a, pred_b = _check(y, pred_a, pred_b)
    ra, rb = pred_a == y, pred_b == y
    b, c = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p": p}


def verdict(lo: float, hi: float) -> str:
    """``wins`` if the interval lies above 0, ``loses`` if below, else ``ties`` (it includes 0)."""
    if lo > 0:
        return "wins"
    if hi < 0:
        return "loses"
    return "ties"


def compare(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, metric: str = "macro_f1", n_boot: int = 2000, seed: int = 0
) -> dict:
    """:func:`paired_bootstrap` plus ``verdict`` and the :func:`mcnemar` fields ``b``, ``c``, ``p``."""
    result = paired_bootstrap(y, pred_a, pred_b, metric, n_boot, seed)
    result["verdict"] = verdict(result["lo"], result["hi"])
    result.update(mcnemar(y, pred_a, pred_b))
    return result


def _pt(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-0.0", "+0.0")


def comparison_sentence(name_a: str, name_b: str, result: dict) -> str:
    """One plain-English sentence for a report, worded by the interval alone.

    Args:
        name_a: the candidate's name.
        name_b: the reference's name.
        result: a :func:`paired_bootstrap` or :func:`compare` dict; McNemar's ``p`` is quoted when present.
    """
    v = verdict(result["lo"], result["hi"])
    head = {
        "wins": f"{name_a} wins against {name_b}",
        "loses": f"{name_a} loses against {name_b}",
        "ties": f"{name_a} is tied with {name_b} (the interval includes 0)",
    }[v]
    metric = _METRIC_LABEL.get(result["metric"], result["metric"])
    text = (
        f"{head}: {metric} {_pt(result['diff'])} pt (95% CI {_pt(result['lo'])} to {_pt(result['hi'])}, "
        f"paired bootstrap, n={result['n']})"
    )
    if "p" in result:
        p = result["p"]
        text += f"; McNemar p{'<0.001' if p < 0.001 else f'={p:.3f}'}"
    return text + "."
