"""Feature-transfer heads: fit a logistic-regression or MLP :class:`~graft.model.Head` on cached features,
or turn a fitted scikit-learn pipeline (:mod:`graft.select`) into one."""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from graft import GraftError
from graft.model import Head, make_head
from graft.params import TrainParams


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (K * n_c), so every class counts as much in the loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_head(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    tp: TrainParams,
    seed: int = 0,
) -> tuple[Head, list[dict]]:
    """Fit a head with AdamW and early stopping on validation loss; return it and the per-epoch history."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=torch.long)
    xv, yv = torch.tensor(x_val, dtype=torch.float32), torch.tensor(y_val, dtype=torch.long)
    head = Head(xt.shape[1], n_classes, tp.head, tp.hidden, tp.dropout)
    head.mean.copy_(xt.mean(0))
    std = xt.std(0, unbiased=False)
    # Floor the scale: post-ReLU features that are almost always 0 would otherwise be blown up.
    head.std.copy_(std.clamp_min(0.1 * float(std.mean()) + 1e-8))
    weight = class_weights(y_tr, n_classes) if tp.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(head.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    monitor_x, monitor_y = (xv, yv) if len(yv) else (xt, yt)  # no val split: monitor the train loss
    best, best_loss, since, history = copy.deepcopy(head.state_dict()), float("inf"), 0, []
    for epoch in range(1, tp.max_epochs + 1):
        head.train()
        order = torch.randperm(len(yt), generator=gen)
        total = 0.0
        for i in range(0, len(order), tp.batch_size):
            idx = order[i : i + tp.batch_size]
            loss = loss_fn(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(monitor_x)
            val_loss = float(nn.functional.cross_entropy(logits, monitor_y))
            val_acc = float((logits.argmax(1) == monitor_y).float().mean())
            train_acc = float((head(xt).argmax(1) == yt).float().mean())
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(yt),
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
            }
        )
        if val_loss < best_loss - 1e-6:
            best, best_loss, since = copy.deepcopy(head.state_dict()), val_loss, 0
        else:
            since += 1
            if since >= tp.patience:
                break
    head.load_state_dict(best)
    return head.eval(), history


def head_spec(pipeline: Pipeline) -> dict:
    """The ``graft.model.head_config`` dict that builds a :class:`graft.model.Head` for ``pipeline``."""
    scaler, clf = _parts(pipeline)
    if isinstance(clf, LogisticRegression):
        return {"kind": "logreg", "dim": int(scaler.mean_.size), "hidden": 0, "dropout": 0.0}
    return {"kind": "mlp", "dim": int(scaler.mean_.size), "hidden": int(clf.coefs_[0].shape[1]), "dropout": 0.0}


def to_torch_head(pipeline: Pipeline, n_classes: int) -> dict[str, torch.Tensor]:
    """A fitted :func:`fit_linear` / :func:`fit_mlp` pipeline as the state dict of graft's ``Head``.

    Logit ``k`` belongs to ``pipeline.classes_[k]``; for the head to index classes like graft does,
    train on integer labels 0..n_classes-1. A binary model has one output ``z``; it becomes the two
    logits ``[0, z]``, whose softmax equals ``predict_proba``.
    """
    scaler, clf = _parts(pipeline)
    classes = np.asarray(clf.classes_)
    if classes.size != n_classes:
        raise GraftError(
            f"the fitted model knows {classes.size} classes but the head needs {n_classes}: "
            "every class must have training samples"
        )
    if classes.dtype.kind in "iu" and not np.array_equal(classes, np.arange(n_classes)):
        raise GraftError(f"integer labels must be 0..{n_classes - 1}, got {classes.tolist()}: encode labels first")
    if isinstance(clf, LogisticRegression):
        layers = [(clf.coef_, clf.intercept_)]
        prefixes = ["net.0"]
    else:
        layers = [(clf.coefs_[0].T, clf.intercepts_[0]), (clf.coefs_[1].T, clf.intercepts_[1])]
        prefixes = ["net.0", "net.3"]  # Sequential(Linear, ReLU, Dropout, Linear)
    w, b = layers[-1]
    if n_classes == 2 and w.shape[0] == 1:  # sigmoid output -> logits [0, z]
        layers[-1] = (np.vstack([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b]))
    state = {"mean": scaler.mean_, "std": scaler.scale_}
    for prefix, (w, b) in zip(prefixes, layers, strict=True):
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w, b
    return {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def head_logits(pipeline: Pipeline, x: np.ndarray) -> np.ndarray:
    """The logits graft's exported head computes for a fitted pipeline on raw features ``x`` (float32; a binary
    model's are ``[0, z]``): what the calibration and the ensemble must see, as the energy score is not
    invariant to a shift of a row's logits. torch's global RNG is left as it was (cv_grid calls this inside the
    LP-FT probe, after the fine-tune's seed is set)."""
    n = len(_parts(pipeline)[1].classes_)
    with torch.random.fork_rng(devices=[]):  # the layers' initial draws, overwritten by the state right after
        head = make_head(head_spec(pipeline), n)
    head.load_state_dict(to_torch_head(pipeline, n))
    with torch.no_grad():
        return head.eval()(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def _parts(pipeline: Pipeline) -> tuple[StandardScaler, LogisticRegression | MLPClassifier]:
    steps = [s for _, s in pipeline.steps]
    if (
        len(steps) != 2
        or not isinstance(steps[0], StandardScaler)
        or not isinstance(steps[1], (LogisticRegression, MLPClassifier))
        or not hasattr(steps[1], "classes_")
    ):
        raise GraftError(
            "expected a fitted StandardScaler + LogisticRegression/MLPClassifier pipeline (from fit_linear or fit_mlp)"
        )
    return steps[0], steps[1]
