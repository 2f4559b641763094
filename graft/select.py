"""Choosing among candidate models on small data: stratified CV, the one-standard-error rule, sklearn heads
(turned into graft heads by :mod:`graft.heads`).

``train.mode: auto`` scores candidates by cross-validated macro-F1 and keeps the *simplest* one whose
score is within one standard error of the best (Hastie, Tibshirani & Friedman, ESL 7.10): on a few
dozen images per class the best mean is partly luck, and the simpler model generalises at least as well.

Typical use on cached features ``X`` (float32, n x d) and integer labels ``y`` (0..K-1)::

    splits = cv_splits(y)
    best = one_se_choice(cv_grid("linear", X, y, LINEAR_C_GRID, splits))
    pipe = fit_linear(X, y, best.settings["C"])
    head = Head(X.shape[1], K, "logreg"); head.load_state_dict(to_torch_head(pipe, K))
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from graft import GraftError
from graft.compare import bootstrap_scores

# Converting a fitted pipeline into a graft head lives in graft.heads; tasks/auto.py still imports it from here.
from graft.heads import head_logits
from graft.heads import head_spec as head_spec
from graft.heads import to_torch_head as to_torch_head

# Inverse L2 strength for standardised features: 1e-3 is close to a nearest-centroid rule, 10 nearly unpenalised.
LINEAR_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# sklearn's MLP L2 penalty (alpha / 2n * |W|^2): 1e-4 is its default, 10 shrinks hard.
MLP_ALPHA_GRID = (1e-4, 1e-2, 1.0, 10.0)
LINEAR_MAX_ITER = 3000  # lbfgs on 2500 standardised dims at weak C needs well over the default 100
MLP_MAX_ITER = 40  # a fixed epoch budget (no early stopping): deterministic, bounded time (~20 fits per grid)


@dataclass(frozen=True)
class Candidate:
    """One scored candidate: a model kind, or one regularisation setting of it.

    Attributes:
        name: a readable label, e.g. ``"logreg C=0.1"``.
        score: mean macro-F1 over CV folds (or one validation score).
        se: its standard error (see :func:`se_of_mean`, :func:`bootstrap_se`).
        cost: lower = cheaper or simpler; only its ordering matters (seconds, or a simplicity rank).
        settings: the hyper-parameters that rebuild the model.
        fold_scores: per-fold macro-F1, empty for a single validation score.
        fit_seconds: wall time spent fitting this candidate over all folds.
        oof: the exported head's logits on each row a fold held out, and which rows those are (``None`` where
            not kept): the calibration and the ensemble read them instead of fitting the folds again.
    """

    name: str
    score: float
    se: float
    cost: float
    settings: dict = field(default_factory=dict)
    fold_scores: tuple[float, ...] = ()
    fit_seconds: float = 0.0
    oof: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)

    @property
    def cv_std(self) -> float:
        """The standard deviation of the fold scores (NaN for a single validation score)."""
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else float("nan")


def cv_splits(y: np.ndarray, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled K-fold splits; K drops to the rarest class's count so every fold sees every class.

    Raises:
        GraftError: fewer than two classes, or a class with fewer than two samples.
    """
    y = np.asarray(y).ravel()
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise GraftError(f"cross-validation needs at least 2 classes, got {classes.size}: add images of another class")
    if counts.min() < 2:
        rare = ", ".join(repr(c.item()) for c in classes[counts < 2])
        raise GraftError(
            f"class {rare} has fewer than 2 training samples: add images or drop the class "
            "before choosing a model by cross-validation"
        )
    k = int(min(n_splits, counts.min()))
    if k < 2:
        raise GraftError(f"n_splits must be at least 2 (got {n_splits})")
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in folds.split(np.zeros((y.size, 1)), y)]


def se_of_mean(scores: Sequence[float]) -> float:
    """Standard error of the mean of fold scores: sample std / sqrt(k).

    CV folds share training data, so this understates the true spread; it is the usual yardstick
    of the one-SE rule all the same. 0.0 for a single score.
    """
    s = np.asarray(scores, dtype=np.float64)
    return float(s.std(ddof=1) / np.sqrt(s.size)) if s.size > 1 else 0.0


def bootstrap_se(y: np.ndarray, pred: np.ndarray, metric: str = "macro_f1", n_boot: int = 500, seed: int = 0) -> float:
    """Standard error of a single validation score by bootstrap over the validation images.

    Bootstrap rather than the binomial sqrt(p(1-p)/n), which holds for accuracy only, not macro-F1.
    """
    return float(np.std(bootstrap_scores(y, pred, metric, n_boot, seed), ddof=1))


def one_se_choice(rows: Sequence[Candidate]) -> Candidate:
    """The one-standard-error rule: the cheapest candidate scoring within one SE of the best.

    best = the highest score (ties: lower cost, then name). Eligible = every row with
    ``score >= best.score - best.se`` (when the best has a single held-out score and others were
    cross-validated, the tolerance is at most the SE of the best cross-validated row). Chosen = the
    eligible row with the lowest cost (ties: higher score, then name), so the result never depends on the
    order of ``rows``. NaN scores are never eligible.
    """
    valid = [r for r in rows if np.isfinite(r.score)]
    if not valid:
        raise GraftError("no candidate has a finite score: every candidate failed to train or score")
    best = min(valid, key=lambda r: (-r.score, r.cost, r.name))
    tolerance = best.se if np.isfinite(best.se) else 0.0
    cross_validated = [r for r in valid if len(r.fold_scores) > 1 and np.isfinite(r.se)]
    if len(best.fold_scores) <= 1 and cross_validated:
        # The best was scored once (fine-tuning on the val split): on a small split its SE is wide (+-0.11 on
        # 33 images), and the rule would fall back to models that cross-validation measured as clearly worse.
        # The tolerance is then the SE of the best cross-validated estimate, the most precise one at the top.
        tolerance = min(tolerance, max(cross_validated, key=lambda r: (r.score, -r.cost)).se)
    floor = best.score - tolerance - 1e-12  # 1e-12: float noise is not a loss
    return min((r for r in valid if r.score >= floor), key=lambda r: (r.cost, -r.score, r.name))


def fit_linear(
    X: np.ndarray, y: np.ndarray, C: float, class_weight: str | None = None, shared_scale: bool = False
) -> Pipeline:
    """Standardise, then multinomial L2 logistic regression (lbfgs) with inverse strength ``C``.

    The fit walks :data:`LINEAR_C_GRID` up to ``C`` with warm starts, as :func:`cv_grid` does on each fold:
    at weak penalties on few, wide samples lbfgs stops at its tolerance, at a point that depends on the start
    (stamps' fusion, C=10: cold refits scored 2.5 pt under the warm CV), so only this refits the model scored.

    ``shared_scale``: centre each feature but divide all of them by one scale (the whole matrix's std), so a
    near-constant feature is not blown up (the LP-FT probe, :func:`graft.lpft._probe_head`).
    """
    scaler = StandardScaler().fit(X)
    if shared_scale:
        scaler.scale_ = np.full_like(scaler.scale_, float(X.std()) or 1.0)
    xs = scaler.transform(X)
    model = _logreg(C, class_weight, warm_start=True)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in [c for c in sorted(LINEAR_C_GRID) if c < C] + [C]:  # the path cv_grid scored C on
            model.set_params(C=c).fit(xs, y)
    return make_pipeline(scaler, model)


def fit_mlp(
    X: np.ndarray,
    y: np.ndarray,
    alpha: float,
    hidden: int = 256,
    max_iter: int = MLP_MAX_ITER,
    seed: int = 0,
    class_weight: str | None = None,
) -> Pipeline:
    """Standardise, then a one-hidden-layer ReLU MLP (adam, fixed epochs, fixed seed, L2 ``alpha``); ``class_weight
    "balanced"`` weighs each image by n / (K * n_c)."""
    pipe = make_pipeline(StandardScaler(), _mlp(alpha, hidden, max_iter, seed, len(y)))
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed epoch budget is the point
        return pipe.fit(X, y, mlpclassifier__sample_weight=_sample_weight(class_weight, y))


def _sample_weight(class_weight: str | None, y: np.ndarray) -> np.ndarray | None:
    return compute_sample_weight(class_weight, y) if class_weight else None


def _logreg(C: float, class_weight: str | None, warm_start: bool = False) -> LogisticRegression:
    return LogisticRegression(
        C=C, solver="lbfgs", max_iter=LINEAR_MAX_ITER, class_weight=class_weight, warm_start=warm_start
    )


def _mlp(alpha: float, hidden: int, max_iter: int, seed: int, n: int) -> MLPClassifier:
    # ~10 adam steps per epoch at least: sklearn's batch of 200 gives a 150-image set one step an epoch.
    batch = int(np.clip(n // 10, 16, 200))
    return MLPClassifier(
        hidden_layer_sizes=(hidden,),
        activation="relu",
        alpha=alpha,
        batch_size=batch,
        early_stopping=False,
        max_iter=max_iter,
        random_state=seed,
    )


def cv_grid(
    kind: str,
    X: np.ndarray,
    y: np.ndarray,
    grid: Sequence[float],
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    class_weight: str | None = None,
    hidden: int = 256,
    max_iter: int = MLP_MAX_ITER,
    seed: int = 0,
) -> list[Candidate]:
    """Score every regularisation value by macro-F1 on each fold's held-out part.

    Args:
        kind: ``linear`` (``grid`` holds C values) or ``mlp`` (``grid`` holds alpha values).
        X: features, n x d.
        y: labels.
        grid: the values to try.
        splits: from :func:`cv_splits`.
        class_weight: ``None`` or ``"balanced"`` (kept in each row's settings for the refit).
        hidden, max_iter, seed: the MLP's width, epoch budget and seed.

    Returns:
        One :class:`Candidate` per grid value, in grid order. ``cost`` is a simplicity rank
        (0 = strongest regularisation: smallest C, largest alpha), so :func:`one_se_choice`
        applies the one-SE rule to the regularisation strength. ``oof``: each fold's model's exported-head
        logits on the rows it held out (what :func:`fit_linear` / :func:`fit_mlp` on the fold would give).

    Time measured on 2000 x 2500 float32, 5 folds, one thread: the linear grid of 5 about 1.5 s
    (warm starts); the MLP grid of 4 at hidden 256 about 70 s (3.6 s a fit): pass fewer splits there.
    """
    if kind not in ("linear", "mlp"):
        raise GraftError(f"unknown candidate kind {kind!r}: use 'linear' or 'mlp'")
    if not len(grid) or not splits:
        raise GraftError("cv_grid needs at least one grid value and one split")
    key = "C" if kind == "linear" else "alpha"
    # Strong to weak regularisation: the order warm starts follow, and the simplicity rank.
    order = sorted(range(len(grid)), key=lambda i: grid[i] if kind == "linear" else -grid[i])
    labels = np.unique(y)
    scores = np.zeros((len(grid), len(splits)))
    seconds = np.zeros(len(grid))
    covered = np.zeros(len(y), bool)
    covered[np.concatenate([va for _, va in splits])] = True
    at = np.cumsum(covered) - 1  # a held-out row's place among the held-out rows (only those are kept: val only)
    logits = np.zeros((len(grid), int(covered.sum()), labels.size), np.float32)
    # small matrices: one BLAS thread is as fast, and immune to a busy host (threaded BLAS on 2 busy cores: ~5x slower)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for f, (tr, va) in enumerate(splits):
            scaler = StandardScaler().fit(X[tr])  # one scaler per fold, shared by the whole grid
            Xtr, Xva = scaler.transform(X[tr]), scaler.transform(X[va])
            # Warm starts from the previous C: fast, and at weak penalties (where lbfgs stops at its tolerance, not
            # at the optimum) the answer depends on them, so fit_linear refits along the same path. The MLP is not
            # convex: a warm start would make it depend on grid order.
            linear = _logreg(1.0, class_weight, warm_start=True)
            for i in order:
                t0 = time.perf_counter()
                model: LogisticRegression | MLPClassifier = (
                    linear.set_params(C=grid[i]) if kind == "linear" else _mlp(grid[i], hidden, max_iter, seed, tr.size)
                )
                weights = None if kind == "linear" else _sample_weight(class_weight, y[tr])  # linear: in the model
                fitted = model.fit(Xtr, y[tr], sample_weight=weights)
                seconds[i] += time.perf_counter() - t0
                scores[i, f] = f1_score(y[va], fitted.predict(Xva), labels=labels, average="macro", zero_division=0)
                logits[i][at[va]] = head_logits(make_pipeline(scaler, fitted), X[va])  # ingest: every class in train
    rank = {i: r for r, i in enumerate(order)}
    rows = []
    for i, value in enumerate(grid):
        settings: dict = {key: float(value)} if kind == "linear" else {key: float(value), "hidden": int(hidden)}
        if class_weight:
            settings["class_weight"] = class_weight
        name = f"{'logreg' if kind == 'linear' else 'mlp'} {key}={value:g}"
        rows.append(
            Candidate(
                name,
                float(scores[i].mean()),
                se_of_mean(scores[i]),
                float(rank[i]),
                settings,
                tuple(float(s) for s in scores[i]),
                float(seconds[i]),
                (logits[i], covered),
            )
        )
    return rows
