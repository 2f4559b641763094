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


def write_curves(history: list[dict], metrics_dir: str | Path, plots_dir: str | Path) -> None:
    """Loss and accuracy per epoch for train and val: DVC plot data (CSV) and a PNG."""
    plt = _pyplot()
    frame = pd.DataFrame(history)[["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]]
    write_csv(Path(metrics_dir) / "curves.csv", frame)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        ax_loss.plot(frame["epoch"], frame[f"{split}_loss"], label=split)
        ax_acc.plot(frame["epoch"], frame[f"{split}_accuracy"], label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.legend()
    fig.tight_layout()
    write_with(Path(plots_dir) / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_reliability(path: Path, table: pd.DataFrame, calibration: dict) -> None:
    """Reliability diagram of the shipped (calibrated) probabilities: accuracy against confidence per bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot(table["confidence"], table["accuracy"], marker="o", label="test split")
    ax.set(
        xlabel="confidence (top class)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"T={calibration['temperature']:.2f}: ECE {calibration['ece_before']:.3f} "
        f"-> {calibration['ece_after']:.3f}",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
