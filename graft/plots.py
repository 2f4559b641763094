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


def write_curves(history: list[dict], metrics_dir: str | Path) -> None:
    """Loss and accuracy per epoch for train and val: the DVC plot data (``curves.csv``), with the kept epoch
    marked in ``best``. The training stages write it; ``graft evaluate`` draws it (:func:`plot_curves`), so
    training never imports matplotlib."""
    frame = pd.DataFrame(history)[["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]]
    best = best_epoch(frame)
    # `best` marks the kept epoch for the DVC charts (template .dvc/plots/curves_best_epoch.json draws a rule there)
    write_csv(Path(metrics_dir) / "curves.csv", frame.assign(best=(frame["epoch"] == best).astype(int)))


def plot_curves(csv: Path, png: Path) -> None:
    """``curves.csv`` drawn as a PNG for offline reading, the kept epoch marked; without the CSV, no PNG (a stale
    one is removed)."""
    if not csv.is_file():
        png.unlink(missing_ok=True)
        return
    frame = pd.read_csv(csv)
    best = best_epoch(frame)  # the epoch write_curves marked: the same rule on the same columns
    plt = _pyplot()
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
    write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
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


def plot_gallery(path: Path, images: list[Path], captions: list[str], title: str, cols: int = 8) -> None:
    """A grid of image thumbnails with a caption under each; an empty list gives a figure that says so."""
    from graft.images import load_rgb

    plt = _pyplot()
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img_path, caption in zip(axes.ravel(), images, captions, strict=False):
        try:
            img = load_rgb(img_path, min_side=128)[0]
        except (OSError, ValueError):  # moved or damaged since ingest: the caption still names it
            ax.set_title(f"{caption}\n(unreadable)", fontsize=7)
            continue
        img.thumbnail((128, 128))
        ax.imshow(np.asarray(img), interpolation="nearest")  # nearest: tiny scans stay crisp, not blurred
        ax.set_title(caption, fontsize=7)
    if not images:
        axes[0, 0].text(0, 0.5, "nothing to show", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
