"""Train a head on cached features (feature transfer): softmax logistic regression or a small MLP.

The head standardises its input with train-split statistics held as buffers, so the exported
graph needs no outside preprocessing of the features. Early stopping keeps the epoch with the
lowest validation loss. The fitting itself is :func:`graft.heads.fit_head`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from graft.atomic import write_json
from graft.auto import write_leaderboard
from graft.cache import load_feature_table, select_columns, tap_columns
from graft.dataset import read_classes, read_manifest, split_arrays
from graft.heads import fit_head
from graft.model import backbone_entry, head_config, save_model
from graft.params import Params
from graft.plots import write_curves
from graft.tasks import stage_task
from graft.trust import calibrate


def train(params: Params) -> dict:
    """Run the train stage (head mode): fit on train, stop early on val, save ``models/model.pt``."""
    tp = params.train
    manifest = read_manifest(params.data.out_dir)
    classes = read_classes(params.data.out_dir)
    feats, meta = load_feature_table(params.featurize.out)
    columns = tap_columns(meta, ("last",))  # the usual pooled features; auto mode also tries the other taps
    x_tr, y_tr = split_arrays(manifest, feats, classes, "train")
    x_val, y_val = split_arrays(manifest, feats, classes, "val")
    x_tr, x_val = select_columns(x_tr, columns), select_columns(x_val, columns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the head's matrices are small: one thread is as fast and immune to a busy host
    try:
        head, history = fit_head(x_tr, y_tr, x_val, y_val, len(classes), tp, params.seed)
    finally:
        torch.set_num_threads(threads)
    best = min(history, key=lambda h: h["val_loss"])
    payload = {
        "kind": "head",
        "classes": classes,
        "backbone": backbone_entry(params.featurize, ("last",)),
        "head": head_config(tp.head, x_tr.shape[1], tp.hidden, tp.dropout),
        "state_dict": head.state_dict(),
        "history": history,
        "calibration": calibrate(
            *_heldout_logits(head, (x_val, y_val) if len(y_val) else (x_tr, y_tr)),
            params.predict.accept_rate,
            params.predict.unknown_score,
        ),
    }
    save_model(Path(tp.model_dir) / "model.pt", payload)
    summary = {
        "mode": "head",
        "head": tp.head,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "val_loss": round(best["val_loss"], 4),
        "val_accuracy": round(best["val_accuracy"], 4),
        "train_images": int(len(y_tr)),
        "val_images": int(len(y_val)),
    }
    write_json(Path(params.evaluate.metrics_dir) / "train.json", summary)
    write_curves(history, params.evaluate.metrics_dir)
    write_leaderboard(
        params.evaluate.metrics_dir,
        [
            {  # one candidate: the one train.mode names
                "candidate": f"{tp.head} head",
                "chosen": True,
                "scored_on": f"val split (n={len(y_val)})",
                "note": "train.mode: head (no selection)",
                "settings": json.dumps({"lr": tp.lr, "weight_decay": tp.weight_decay}),
            }
        ],
    )
    return summary


def _heldout_logits(head: torch.nn.Module, data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The head's logits on held-out features (val; train when there is no val split), and the labels."""
    with torch.no_grad():
        return head(torch.from_numpy(data[0]).float()).numpy(), data[1]


train_task = stage_task(train, "train")
