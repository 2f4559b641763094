"""LP-FT as an auto candidate: a linear probe at the data's input size, then fine-tuning from it with EMA.

Kumar et al. 2022 (LP-FT): starting the new classifier from a fitted linear probe instead of random
weights distorts the pretrained features less, and beats plain fine-tuning in and out of distribution.
The candidate is scored on the val split (too slow to fit k times); the refit trains a fresh copy on
train+val for the number of epochs the search chose.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from torch import nn

from graft import GraftError
from graft.auto import Result, data_image_size, finetune_seconds, probe_features
from graft.compare import score as metric_score
from graft.dataset import split_items
from graft.images import Preprocess
from graft.model import Classifier, head_config, initial_model, make_head, run_key
from graft.params import FinetuneParams, Params
from graft.precision import device_and_amp
from graft.select import (
    LINEAR_C_GRID,
    Candidate,
    bootstrap_se,
    cv_grid,
    cv_splits,
    fit_linear,
    head_spec,
    one_se_choice,
    to_torch_head,
)
from graft.tune import fit, predict_logits


def _remaining(deadline: float) -> float:
    return deadline - time.perf_counter()


def _rows(manifest: pd.DataFrame, splits: tuple[str, ...]) -> pd.DataFrame:
    """Manifest rows of ``splits``, in that split order."""
    return pd.concat([manifest[manifest["split"] == s] for s in splits], ignore_index=True)


def finetune_candidate(
    params: Params, manifest: pd.DataFrame, classes: list[str], deadline: float, probe_c: float
) -> Result:
    """LP-FT: fit a linear probe at the data's input size, start the classifier from it, fine-tune with EMA.

    Scored on the val split; skipped (with the reason) when its estimated time does not fit the budget.
    """
    ft = params.train.finetune
    size = data_image_size(params, manifest)
    train_items, val_items = (split_items(manifest, params.data.root, classes, s) for s in ("train", "val"))
    if not len(val_items[0]):
        return Result("finetune", note="skipped: fine-tuning is scored on the val split, which is empty")
    t0 = time.perf_counter()
    model, bb, note = initial_model(params, classes, size)
    x_tr, s_per_img = probe_features(model.features, train_items[0], bb.preprocess, workers=ft.workers)
    need = finetune_seconds(s_per_img, len(train_items[0]), len(val_items[0]), ft.epochs) * 2  # search + refit
    if need > _remaining(deadline):
        return Result(
            "finetune",
            note=f"skipped: needs about {need / 60:.1f} min at {size} px, "
            f"{max(_remaining(deadline), 0) / 60:.1f} min of train.budget_minutes left",
        )
    if ft.init == "probe" and note["head"] != "loaded":
        _probe_head(model, x_tr, train_items[1], len(classes), probe_c)
    ftp = ft.model_copy(update={"image_size": size, "head_epochs": 0 if ft.init == "probe" else ft.head_epochs})
    key = run_key(params, manifest, bb.fingerprint) + "-search"
    state, history = _fit_once(model, train_items, val_items, bb.preprocess, ftp, params, len(classes), key, "finetune")
    model.load_state_dict(state)
    val_logits = predict_logits(model, val_items[0], bb.preprocess, workers=ft.workers)
    pred = val_logits.argmax(1)
    score = metric_score(val_items[1], pred, "macro_f1")  # over the classes present, like the feature candidates' folds
    best_epoch = int(min(history, key=lambda h: h["val_loss"])["epoch"])
    settings = {"image_size": size, "best_epoch": best_epoch, "strategy": ft.strategy, "ema": ft.ema, "init": ft.init}
    best = Candidate("finetune", score, bootstrap_se(val_items[1], pred), 0.0, settings)
    return Result(
        "finetune",
        ("last",),
        "finetune",
        best,
        [],
        time.perf_counter() - t0,
        f"val split (n={len(val_items[0])})",
        extra={
            "history": history,
            "probe_c": probe_c,
            "state": state,
            "head": _head_config(model),
            "heldout_logits": (val_logits, val_items[1]),
        },
    )


def _head_config(model: Classifier) -> dict:
    net = cast(nn.Sequential, model.head.net)  # a fine-tuned model's head is a plain Head
    first = cast(nn.Linear, net[0])
    hidden = first.out_features if len(net) > 1 else 0
    return head_config("mlp" if hidden else "logreg", first.in_features, hidden, 0.0)


def _probe_head(model: Classifier, x: np.ndarray, y: np.ndarray, n_classes: int, c: float) -> None:
    """Replace the model's new head by a logistic-regression probe fitted on its frozen features (LP).

    The features are centred and divided by one scale for all of them, not standardised per feature: a
    near-constant feature (on 8x8 digits a tenth of Lite0's have std < 0.003) would get a weight hundreds of
    times larger, and as soon as fine-tuning moves it the logits explode (measured: train loss 26 in the
    first epoch, val accuracy 0.36 after 8). With one scale, a feature counts as much as the network makes it.
    """
    pipe = fit_linear(x, y, c, shared_scale=True)
    head = make_head(head_spec(pipe), n_classes)
    head.load_state_dict(to_torch_head(pipe, n_classes))
    model.head = head


def probe_start(
    model: Classifier,
    items: tuple[list[str], np.ndarray],
    n_classes: int,
    pp: Preprocess,
    workers: int,
    seed: int,
    c: float | None = None,
    precision: str = "fp32",
    features: np.ndarray | None = None,
) -> float:
    """LP-FT's first step: start the classifier from a logistic-regression probe on the frozen features at the
    fine-tune size, with ``c``, or C chosen by 5-fold CV with the one-SE rule. Returns the C used. The
    features are ``features`` (the feature cache's, where featurize computed them for this backbone and size),
    else computed in the fine-tune's ``precision`` (in bf16 the pass over 166 photos at 224 px took 2.1 s
    instead of 3.0 s, decoding included)."""
    device, amp = device_and_amp(precision, pp.crop)  # the probe pass itself runs on the CPU
    x = features
    if x is None:
        x, _ = probe_features(model.features, items[0], pp, workers=workers, amp=amp if device.type == "cpu" else None)
    if c is None:
        try:
            splits = cv_splits(items[1], 5, seed)
            c = one_se_choice(cv_grid("linear", x, items[1], LINEAR_C_GRID, splits)).settings["C"]
        except GraftError:  # a class with a single image: no CV, the library default
            c = 1.0
    _probe_head(model, x, items[1], n_classes, c)
    return float(c)


def refit_finetune(
    params: Params, manifest: pd.DataFrame, classes: list[str], result: Result, splits: tuple[str, ...]
) -> dict:
    """The fine-tuned winner retrained on ``splits`` for the epochs the search chose (no early stopping);
    on the train split alone that is the search's own model."""
    ft, s = params.train.finetune, result.chosen.settings
    if splits == ("train",):
        return {"state_dict": result.extra["state"], "head": result.extra["head"], "fit": "train"}
    rows = _rows(manifest, splits)
    paths = [str(Path(params.data.root) / p) for p in rows["path"]]
    y = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    model, bb, note = initial_model(params, classes, s["image_size"])
    if ft.init == "probe" and note["head"] != "loaded":
        probe_start(
            model,
            (paths, y),
            len(classes),
            bb.preprocess,
            ft.workers,
            params.seed,
            result.extra["probe_c"],
            ft.precision,
        )
    ftp = ft.model_copy(
        update={
            "image_size": s["image_size"],
            "epochs": s["best_epoch"],
            "patience": 10**6,
            "head_epochs": 0 if ft.init == "probe" else ft.head_epochs,
        }
    )
    key = run_key(params, manifest, bb.fingerprint) + "-" + "+".join(splits)
    no_val: tuple[list[str], np.ndarray] = ([], np.zeros(0, np.int64))
    state, _ = _fit_once(model, (paths, y), no_val, bb.preprocess, ftp, params, len(classes), key, "refit")
    return {"state_dict": state, "head": _head_config(model), "fit": "+".join(splits)}


def _fit_once(
    model: Classifier,
    train_items: tuple[list[str], np.ndarray],
    val_items: tuple[list[str], np.ndarray],
    pp: Preprocess,
    ftp: FinetuneParams,
    params: Params,
    n_classes: int,
    key: str,
    name: str,
) -> tuple[dict, list[dict]]:
    """:func:`graft.tune.fit` with its resume checkpoint at ``models/checkpoints/auto-<name>.pt`` (a killed
    run resumes from it), deleted once the run has finished; returns (the best state dict, the history)."""
    checkpoint = Path(params.train.model_dir) / "checkpoints" / f"auto-{name}.pt"
    state, history, _ = fit(
        model, train_items, val_items, pp, ftp, n_classes, params.seed, checkpoint, key, params.train.class_weights
    )
    checkpoint.unlink(missing_ok=True)
    return state, history
