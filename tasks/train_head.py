"""Train a head on cached features (feature transfer): softmax logistic regression or a small MLP.

The head standardises its input with train-split statistics held as buffers, so the exported
graph needs no outside preprocessing of the features. Early stopping keeps the epoch with the
lowest validation loss.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from graft.atomic import write_json
from graft.model import Head, head_config, head_from_payload, load_model, save_model  # noqa: F401 (re-exported)
from graft.params import Params, TrainParams
from tasks import stage_task
from tasks.featurize import load_feature_table


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (K * n_c), so every class counts as much in the loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
             tp: TrainParams, seed: int = 0) -> tuple[Head, list[dict]]:
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
        history.append({"epoch": epoch, "train_loss": total / len(yt), "train_accuracy": train_acc,
                        "val_loss": val_loss, "val_accuracy": val_acc})
        if val_loss < best_loss - 1e-6:
            best, best_loss, since = copy.deepcopy(head.state_dict()), val_loss, 0
        else:
            since += 1
            if since >= tp.patience:
                break
    head.load_state_dict(best)
    return head.eval(), history


def split_arrays(manifest: pd.DataFrame, feats: dict[str, np.ndarray], classes: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix and class indices of one split, in manifest order."""
    rows = manifest[manifest["split"] == split]
    index = {c: i for i, c in enumerate(classes)}
    if not len(rows):
        return np.zeros((0, next(iter(feats.values())).shape[0]), np.float32), np.zeros(0, np.int64)
    return np.stack([feats[s] for s in rows["sha256"]]), rows["label"].map(index).to_numpy(np.int64)


def write_curves(history: list[dict], params: Params) -> None:
    """Loss and accuracy per epoch for train and val: DVC plot data (CSV) and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graft.atomic import write_csv, write_with

    frame = pd.DataFrame(history)[["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]]
    write_csv(Path(params.evaluate.metrics_dir) / "curves.csv", frame)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        ax_loss.plot(frame["epoch"], frame[f"{split}_loss"], label=split)
        ax_acc.plot(frame["epoch"], frame[f"{split}_accuracy"], label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.legend()
    fig.tight_layout()
    write_with(Path(params.evaluate.plots_dir) / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def train(params: Params) -> dict:
    """Run the train stage (head mode): fit on train, stop early on val, save ``models/model.pt``."""
    tp = params.train
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    classes = json.loads((Path(params.data.out_dir) / "classes.json").read_text())["classes"]
    feats, meta = load_feature_table(params.featurize.out)
    x_tr, y_tr = split_arrays(manifest, feats, classes, "train")
    x_val, y_val = split_arrays(manifest, feats, classes, "val")
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
        "backbone": {"name": params.featurize.backbone, "weights": params.featurize.weights,
                     "image_size": params.featurize.image_size, "fingerprint": meta.get("graft.fingerprint", "")},
        "head": head_config(tp.head, x_tr.shape[1], tp.hidden, tp.dropout),
        "state_dict": head.state_dict(),
        "history": history,
    }
    save_model(Path(tp.model_dir) / "model.pt", payload)
    summary = {"mode": "head", "head": tp.head, "epochs": len(history), "best_epoch": best["epoch"],
               "val_loss": round(best["val_loss"], 4), "val_accuracy": round(best["val_accuracy"], 4),
               "train_images": int(len(y_tr)), "val_images": int(len(y_val))}
    write_json(Path(params.evaluate.metrics_dir) / "train.json", summary)
    write_curves(history, params)
    return summary


train_task = stage_task(train, "train")
