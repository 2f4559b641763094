"""Feature-transfer heads: fit a logistic-regression or MLP :class:`~graft.model.Head` on cached features."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from graft.model import Head
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
