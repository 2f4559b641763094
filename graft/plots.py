"""Plots written by the stages (PNG, atomically), and the CSV data behind DVC's plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graft.atomic import write_csv, write_with


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, y: np.ndarray, pred: np.ndarray, classes: list[str]) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=range(len(classes)), display_labels=classes, ax=ax, colorbar=False, xticks_rotation=45
    )
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def best_epoch(frame: pd.DataFrame) -> int | None:
    """The epoch training kept: the lowest val loss (early stopping's rule), else the best val accuracy."""
    for column, pick in (("val_loss", "idxmin"), ("val_accuracy", "idxmax")):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().any():
            return int(frame.loc[getattr(values, pick)(), "epoch"])
    return None


def write_curves(history: list[dict], metrics_dir: str | Path, plots_dir: str | Path) -> None:
    """Loss and accuracy per epoch for train and val: DVC plot data (CSV) and a PNG marking the best epoch."""
    plt = _pyplot()
    frame = pd.DataFrame(history)[["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]]
    best = best_epoch(frame)
    # `best` marks the kept epoch for the DVC charts (template .dvc/plots/curves_best_epoch.json draws a rule there)
    write_csv(Path(metrics_dir) / "curves.csv", frame.assign(best=(frame["epoch"] == best).astype(int)))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        ax_loss.plot(frame["epoch"], frame[f"{split}_loss"], label=split, marker="." if len(frame) < 30 else None)
        ax_acc.plot(frame["epoch"], frame[f"{split}_accuracy"], label=split, marker="." if len(frame) < 30 else None)
    for ax in (ax_loss, ax_acc):
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        ax.grid(alpha=0.3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.legend()
    fig.tight_layout()
    write_with(Path(plots_dir) / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
