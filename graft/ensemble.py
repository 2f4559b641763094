"""The ``ensemble`` candidate of ``train.mode: auto``: the mean of the feature candidates' class probabilities.

Every feature candidate that ran on the backbone's feature table (pixels, logreg, mlp, multilayer, fusion, each
with the regularisation its own CV chose) is a member; none is picked by its score, so the ensemble's CV score
is as honest as a single candidate's. Its members read different columns (raw pixels, stage features, the last
layer) through different models, and their errors differ: on the pools of ``bench/transfer.py``'s three sets
(3x5-fold CV), the mean of all five beat the best single member by 0.1 (digits), 1.1 (stamps) and 2.1 (icons)
points of macro-F1. It is scored on the same folds as its members and competes under the same one-SE rule; it
sits after them in ``train.candidates`` (a costlier model), so it ships only when it is better by more than the
noise (inside auto, on those sets, it was not: see ``docs/benchmarks.md``).

The exported head is plain modules (:class:`graft.ensemble_head.EnsembleHead`): each member reads its own
columns of the union of the members' taps, and the head returns the log of the mean probability, a valid logit
vector (its softmax is that mean), so calibration, "unknown" and the ONNX contract are those of any other head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import softmax
from sklearn.metrics import f1_score

from graft import GraftError
from graft.auto import FEATURE_CANDIDATES, Result, fit_features
from graft.cache import select_columns, tap_columns
from graft.model import head_config
from graft.registry import canonical_taps
from graft.select import Candidate, bootstrap_se, head_spec, se_of_mean, to_torch_head


def members_of(results: Sequence[Result]) -> list[Result]:
    """The feature candidates an ensemble averages: those that ran on the backbone's own feature table."""
    return [r for r in results if r.ran and r.name in FEATURE_CANDIDATES and "feats" not in r.extra]


def _positions(meta: dict[str, str], taps: tuple[str, ...], union: tuple[str, ...], dim: int) -> np.ndarray:
    """Where ``taps``' columns sit among the columns of ``union`` (both in the table's extractor order)."""
    cols, all_cols = tap_columns(meta, taps), tap_columns(meta, union)
    if not len(all_cols):  # a table that holds the last-layer features only: every column is "last"
        return np.arange(dim)
    return np.searchsorted(all_cols, cols)


def score_ensemble(
    members: Sequence[Result],
    x_all: np.ndarray,
    meta: dict[str, str],
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    scored_on: str,
) -> Result:
    """Score the mean of ``members``' probabilities on ``splits`` (their own folds, their chosen settings).

    Each member's out-of-fold logits are those its own CV kept (``Candidate.oof``): nothing is fitted again. The
    result's ``oof`` is the log mean probability on the rows they cover, for the calibration; ``extra`` holds the
    head config the export builds and the members."""
    if len(members) < 2:
        return Result("ensemble", note="skipped: it averages two or more feature candidates, and fewer ran")
    t0 = time.perf_counter()
    union = canonical_taps([t for r in members for t in r.taps])
    covered, probs, configs = np.zeros(len(y), bool), [], []
    for r in members:
        if r.chosen.oof is None:
            raise GraftError(f"ensemble: member {r.name} kept no out-of-fold logits (score it with cv_grid)")
        logits, covered = r.chosen.oof
        probs.append(softmax(logits, axis=1))
        hidden = int(r.chosen.settings.get("hidden", 0)) if r.kind == "mlp" else 0  # the export's shapes
        dim = len(tap_columns(meta, r.taps)) or x_all.shape[1]
        configs.append(head_config("mlp" if hidden else "logreg", dim, hidden, 0.0) | {"name": r.name})
    mean = np.mean(probs, axis=0)
    pred = np.full(len(y), -1)
    pred[covered] = mean.argmax(1)
    labels = np.unique(y)
    folds = [f1_score(y[va], pred[va], labels=labels, average="macro", zero_division=0) for _, va in splits]
    se = se_of_mean(folds) if len(splits) > 1 else bootstrap_se(y[covered], pred[covered])
    settings = {"members": [r.name for r in members]}
    oof = (np.log(np.clip(mean, 1e-12, None)).astype(np.float32), covered)
    fold_scores = tuple(folds) if len(folds) > 1 else ()
    best = Candidate("ensemble", float(np.mean(folds)), se, 0.0, settings, fold_scores, oof=oof)
    width = len(tap_columns(meta, union)) or x_all.shape[1]
    config = {"kind": "ensemble", "dim": int(width), "hidden": 0, "dropout": 0.0, "members": configs}
    extra = {"head_config": config, "members": list(members)}
    return Result("ensemble", union, "ensemble", best, [best], time.perf_counter() - t0, scored_on, extra=extra)


def fit_ensemble(
    result: Result, x_all: np.ndarray, y: np.ndarray, meta: dict[str, str], n_classes: int, seed: int = 0
) -> dict:
    """Refit every member on ``x_all``'s rows (the whole feature table's columns) with its chosen settings: the
    model file's ``state_dict`` and ``head`` of the ensemble."""
    state: dict[str, torch.Tensor] = {}
    config = {**result.extra["head_config"], "members": []}
    for i, r in enumerate(result.extra["members"]):
        pipe = fit_features(r.kind, select_columns(x_all, tap_columns(meta, r.taps)), y, r.chosen.settings, seed)
        state |= {f"members.{i}.{k}": v for k, v in to_torch_head(pipe, n_classes).items()}
        columns = _positions(meta, r.taps, result.taps, x_all.shape[1])
        state[f"columns_{i}"] = torch.as_tensor(columns, dtype=torch.int64)
        config["members"].append({**head_spec(pipe), "name": r.name})
    return {"state_dict": state, "head": config}
