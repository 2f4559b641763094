"""Train, mode ``auto``: try every candidate the budget allows, keep the best for this data, refit it.

Candidates, cheapest first (``train.candidates``): the raw-pixel model, logistic-regression and MLP
heads on the last-layer features, the multi-layer head, the multi-layer + raw-pixel fusion, the ensemble
of those (the mean of their probabilities, :mod:`graft.ensemble`), LP-FT fine-tuning at the input size
the data asks for, and every other backbone whose weights are on this machine. Each is scored on
held-out data (:mod:`graft.auto`); the one-standard-error rule keeps the cheapest within one SE of the
best. The winner is refit on train+val (``train.refit``) with the settings it was chosen with, and,
with ``refit: all``, once more on every image for the exported model (``payload["final"]``), after the
train+val model's test metrics are recorded by evaluate.

Outputs: ``models/model.pt``, ``metrics/leaderboard.csv`` (every candidate, skipped ones with the
reason), ``metrics/train.json`` and the training curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.atomic import write_json
from graft.auto import (
    FEATURE_CANDIDATES,
    Result,
    backbone_features,
    fit_features,
    holdout,
    onnx_cost,
    score_features,
    write_leaderboard,
)
from graft.backbones import build_backbone, local_backbones
from graft.cache import load_feature_table, select_columns, tap_columns
from graft.dataset import read_classes, read_manifest
from graft.ensemble import fit_ensemble, members_of, score_ensemble
from graft.lpft import finetune_candidate, refit_finetune
from graft.model import Classifier, backbone_entry, head_config, make_head, save_model
from graft.params import Params
from graft.plots import write_curves
from graft.select import (
    cv_splits,
    head_spec,
    one_se_choice,
    to_torch_head,
)
from graft.tasks import stage_task
from graft.trust import calibrate


def _rows(manifest: pd.DataFrame, splits: tuple[str, ...]) -> pd.DataFrame:
    """Manifest rows of ``splits``, in that split order (train first: the val "fold" is the tail)."""
    return pd.concat([manifest[manifest["split"] == s] for s in splits], ignore_index=True)


def _matrix(rows: pd.DataFrame, feats: dict[str, np.ndarray], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    return np.stack([feats[s] for s in rows["sha256"]]), rows["label"].map(index).to_numpy(np.int64)


def _remaining(deadline: float) -> float:
    return deadline - time.perf_counter()


def refit_features(
    params: Params,
    manifest: pd.DataFrame,
    feats: dict[str, np.ndarray],
    meta: dict[str, str],
    classes: list[str],
    result: Result,
    splits: tuple[str, ...],
) -> dict:
    """A feature winner refit on ``splits`` with its chosen regularisation, as a graft head."""
    x, y = _matrix(_rows(manifest, splits), feats, classes)
    if result.kind == "ensemble":
        return {**fit_ensemble(result, x, y, meta, len(classes), params.seed), "fit": "+".join(splits)}
    pipe = fit_features(
        result.kind, select_columns(x, tap_columns(meta, result.taps)), y, result.chosen.settings, params.seed
    )
    return {"state_dict": to_torch_head(pipe, len(classes)), "head": head_spec(pipe), "fit": "+".join(splits)}


def auto(params: Params) -> dict:
    """Run the train stage in auto mode; write ``models/model.pt`` and ``metrics/leaderboard.csv``."""
    tp = params.train
    t_start = time.perf_counter()
    deadline = t_start + tp.budget_minutes * 60
    manifest, classes = read_manifest(params.data.out_dir), read_classes(params.data.out_dir)
    feats, meta = load_feature_table(params.featurize.out)
    rows = _rows(manifest, ("train", "val"))
    x_all, y = _matrix(rows, feats, classes)
    n_train = int((rows["split"] == "train").sum())
    if len(rows) < tp.cv_below or n_train == len(rows):  # small (or no val split): k-fold CV on train+val
        splits = cv_splits(y, tp.cv_folds, params.seed)
        scored_on = f"{len(splits)}-fold CV on train+val (n={len(rows)})"
    else:
        splits, scored_on = holdout(n_train, len(rows)), f"val split (n={len(rows) - n_train})"
    results: list[Result] = []
    for name in tp.candidates:
        if _remaining(deadline) <= 0 and any(r.ran for r in results):  # the cheapest one always runs
            results.append(Result(name, note="skipped: train.budget_minutes used up by cheaper candidates"))
        elif name in FEATURE_CANDIDATES:
            try:
                x = select_columns(x_all, tap_columns(meta, FEATURE_CANDIDATES[name][0]))
            except GraftError as exc:
                results.append(Result(name, note=f"skipped: {exc}"))
                continue
            results.append(score_features(name, x, y, splits, scored_on, params.seed, _class_weight(params)))
            print(
                f"auto: {name:<11} macro-F1 {results[-1].chosen.score:.4f} ± {results[-1].chosen.se:.4f} "
                f"({results[-1].seconds:.1f} s)"
            )
        elif name == "ensemble":
            results.append(score_ensemble(members_of(results), x_all, meta, y, splits, scored_on))
            if results[-1].ran:
                print(f"auto: ensemble    macro-F1 {results[-1].chosen.score:.4f} ± {results[-1].chosen.se:.4f}")
        elif name == "finetune":
            probe = next((r for r in results if r.name == "logreg" and r.ran), None)
            results.append(
                finetune_candidate(params, manifest, classes, deadline, probe.chosen.settings["C"] if probe else 1.0)
            )
        elif name == "other_backbones":
            results += other_backbones(params, manifest, classes, rows, splits, scored_on, deadline)
    ran = [r for r in results if r.ran]
    if not ran:
        raise GraftError("auto: no candidate could run (see train.candidates and train.budget_minutes)")
    # cost: the candidate's place in train.candidates, cheapest first (a deterministic order, unlike wall time)
    order = {n: i for i, n in enumerate(tp.candidates)}
    chosen = one_se_choice([replace(r.chosen, name=r.name, cost=order[r.extra.get("group", r.name)]) for r in ran])
    winner = next(r for r in ran if r.name == chosen.name)
    payload = _payload(params, manifest, feats, meta, classes, winner, y)
    save_model(Path(tp.model_dir) / "model.pt", payload)
    write_leaderboard(params.evaluate.metrics_dir, leaderboard(params, results, winner, classes))
    history = winner.extra.get("history") or [
        {
            "epoch": 1,
            "train_loss": float("nan"),
            "val_loss": float("nan"),
            "train_accuracy": float("nan"),
            "val_accuracy": winner.chosen.score,
        }
    ]
    write_curves(history, params.evaluate.metrics_dir)
    summary = {
        "mode": "auto",
        "chosen": winner.name,
        "val_macro_f1": round(winner.chosen.score, 4),
        "val_macro_f1_se": round(winner.chosen.se, 4),
        "scored_on": winner.scored_on,
        "refit": tp.refit,
        "candidates": len(results),
        "ran": len(ran),
        "seconds": round(time.perf_counter() - t_start, 1),
        "budget_minutes": tp.budget_minutes,
    }
    # a DVC output: without the wall time, so a rerun that changes nothing leaves it unchanged
    write_json(Path(params.evaluate.metrics_dir) / "train.json", {k: v for k, v in summary.items() if k != "seconds"})
    return summary


def other_backbones(
    params: Params,
    manifest: pd.DataFrame,
    classes: list[str],
    rows: pd.DataFrame,
    splits: list,
    scored_on: str,
    deadline: float,
) -> list[Result]:
    """A logistic-regression probe on each other backbone whose weights are on this machine."""
    others = [b for b in local_backbones() if b != params.featurize.backbone]
    if not others:
        return [Result("other_backbones", note="skipped: no other backbone has its weights on this machine")]
    out = []
    for name in others:
        if _remaining(deadline) <= 0:
            out.append(Result(f"{name} logreg", note="skipped: train.budget_minutes used up"))
            continue
        fp = params.featurize.model_copy(
            update={"backbone": name, "weights": None, "image_size": None, "taps": ("last",)}
        )
        t0 = time.perf_counter()
        feats, meta = backbone_features(fp, manifest, params.data.root)
        x, y = _matrix(rows, feats, classes)
        r = score_features("logreg", x, y, splits, scored_on, params.seed, _class_weight(params))
        r.name, r.seconds = f"{name} logreg", time.perf_counter() - t0
        r.extra = {"group": "other_backbones", "featurize": fp, "feats": feats, "meta": meta}
        out.append(r)
    return out


def _class_weight(params: Params) -> str | None:
    """sklearn's ``class_weight`` for the feature candidates: ``train.class_weights`` as the head's loss uses it."""
    return "balanced" if params.train.class_weights else None


def _payload(
    params: Params,
    manifest: pd.DataFrame,
    feats: dict[str, np.ndarray],
    meta: dict[str, str],
    classes: list[str],
    winner: Result,
    y: np.ndarray,
) -> dict:
    """The model file of the winner, refit as ``train.refit`` says, with its calibration (temperature and
    unknown threshold) fitted on the winner's held-out logits: out-of-fold for feature candidates."""
    fit_on = {"none": ("train",), "trainval": ("train", "val"), "all": ("train", "val")}[params.train.refit]
    if winner.kind == "finetune":
        logits, y_held = winner.extra["heldout_logits"]

        def refit(splits: tuple[str, ...]) -> dict:
            return refit_finetune(params, manifest, classes, winner, splits)

        size = winner.chosen.settings["image_size"]
    else:
        own_feats, own_meta = winner.extra.get("feats", feats), winner.extra.get("meta", meta)
        if winner.chosen.oof is None:
            raise GraftError(f"auto: {winner.name} kept no out-of-fold logits to calibrate on")
        logits, covered = winner.chosen.oof  # its CV's own fits' held-out logits, refit on nothing
        y_held = y[covered]  # ``y``: the train+val labels in the order every candidate was scored on

        def refit(splits: tuple[str, ...]) -> dict:
            return refit_features(params, manifest, own_feats, own_meta, classes, winner, splits)

        size = None
    model = refit(fit_on)
    fp = winner.extra.get("featurize", params.featurize)
    payload = {
        "kind": "finetune" if winner.kind == "finetune" else "head",
        "classes": classes,
        "backbone": backbone_entry(fp, winner.taps, size),
        "candidate": winner.name,
        "settings": winner.chosen.settings,
        **model,
        "history": winner.extra.get("history", []),
        "calibration": calibrate(logits, y_held, params.predict.accept_rate, params.predict.unknown_score),
    }
    if params.train.refit == "all":  # the exported model also learns from the test images (metrics: the one above)
        payload["final"] = refit(("train", "val", "test"))
    return payload


def leaderboard(params: Params, results: list[Result], winner: Result, classes: list[str]) -> list[dict]:
    """One row per candidate: held-out score ± SE (and the CV folds' std), seconds, settings, and the exported
    graph's size and speed."""
    rows = []
    for r in results:
        row = {
            "candidate": r.name,
            "chosen": r is winner,
            "note": r.note,
            "scored_on": r.scored_on,
            "train_seconds": round(r.seconds, 2),
        }
        if r.ran:
            best = r.chosen
            row.update(score=round(best.score, 4), se=round(best.se, 4), settings=json.dumps(best.settings))
            if np.isfinite(best.cv_std):  # cross-validated: how much the score moves from fold to fold
                row["cv_std"] = round(best.cv_std, 4)
            size = best.settings.get("image_size")
            fp = r.extra.get("featurize", params.featurize)
            bb = build_backbone(fp.backbone, fp.weights, size, r.taps, fp.raw_size)
            config = r.extra.get("head_config") or head_config(
                "mlp" if r.kind == "mlp" else "logreg", bb.feature_dim, int(best.settings.get("hidden", 0)), 0.0
            )
            head = make_head(config, len(classes))
            row["onnx_bytes"], row["latency_ms_batch_1"] = onnx_cost(Classifier(bb.model, head), bb.preprocess.crop)
        rows.append(row)
    return rows


auto_task = stage_task(auto, "auto")
