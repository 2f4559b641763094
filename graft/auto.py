"""``train.mode: auto``: the candidates, how each is scored on held-out data, and how the winner is refit.

Every candidate is judged by macro-F1 on images it was not fitted on: k-fold cross-validation over
train+val for the candidates on cached features when the set is small (``train.cv_below``), the val
split otherwise, and the val split for fine-tuning (too slow to fit k times). Within a candidate, the
regularisation is chosen by the same scores; across candidates the one-standard-error rule keeps the
cheapest candidate within one SE of the best (:func:`graft.select.one_se_choice`).

Feature candidates differ only in which cached columns they read (:data:`FEATURE_CANDIDATES`):
``pixels`` is the raw-pixel baseline as a real, exportable model (its extractor runs no network),
``multilayer`` reads the pooled output of every backbone stage (Head2Toe, Evci et al. 2022), and
``fusion`` puts those beside the raw pixels in one linear model.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.images import Preprocess
from graft.select import (
    LINEAR_C_GRID,
    MLP_ALPHA_GRID,
    Candidate,
    bootstrap_se,
    cv_grid,
    fit_linear,
    fit_mlp,
    one_se_choice,
)

# name -> (the feature taps it reads, in extractor order; the head kind)
FEATURE_CANDIDATES: dict[str, tuple[tuple[str, ...], str]] = {
    "pixels": (("raw",), "linear"),
    "logreg": (("last",), "linear"),
    "mlp": (("last",), "mlp"),
    "multilayer": (("stages",), "linear"),
    "fusion": (("raw", "stages"), "linear"),
}
MIN_FINETUNE_SIZE = 96  # below this the backbone's stride-32 maps shrink to 3x3: nothing left to pool
SIZE_STEP = 32  # the backbones downsample by 32: sizes on that grid waste no border


@dataclass
class Result:
    """One candidate after selection: its best setting's held-out score, or why it did not run."""

    name: str
    taps: tuple[str, ...] = ()
    kind: str = ""
    best: Candidate | None = None
    grid: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0
    scored_on: str = ""  # "5-fold CV on train+val (n=...)" or "val split (n=...)"
    note: str = ""  # a skipped candidate says why
    extra: dict = field(default_factory=dict)  # fine-tuning: image size, best epoch, state, history

    @property
    def ran(self) -> bool:
        return self.best is not None

    @property
    def chosen(self) -> Candidate:
        """The best setting of a candidate that ran."""
        if self.best is None:
            raise ValueError(f"{self.name} did not run: {self.note}")
        return self.best


def holdout(n_train: int, n_total: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The val split as one "fold": rows ``[0, n_train)`` fit, the rest score."""
    return [(np.arange(n_train), np.arange(n_train, n_total))]


def score_features(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    scored_on: str,
    seed: int = 0,
    class_weight: str | None = None,
) -> Result:
    """Score one feature candidate over its regularisation grid; keep the setting the 1-SE rule picks.

    With a single split (the val set) the SE of the score is a bootstrap over the val images. ``class_weight
    "balanced"`` (``train.class_weights: true``) weighs the classes; the settings keep it for the refit.
    """
    taps, kind = FEATURE_CANDIDATES[name]
    t0 = time.perf_counter()
    grid = LINEAR_C_GRID if kind == "linear" else MLP_ALPHA_GRID
    rows = cv_grid(kind, x, y, grid, splits, class_weight=class_weight, seed=seed)
    best = one_se_choice(rows)
    if len(splits) == 1 and best.oof is not None:  # one val score: its SE comes from resampling the val images
        logits, covered = best.oof
        best = replace(best, se=bootstrap_se(y[covered], logits.argmax(1)))
    rows = [replace(r, oof=None) for r in rows]  # the chosen setting's held-out logits are kept in ``best`` only
    return Result(name, taps, kind, best, rows, time.perf_counter() - t0, scored_on)


def fit_features(kind: str, x: np.ndarray, y: np.ndarray, settings: dict, seed: int = 0) -> Any:
    """Fit a feature candidate with fixed settings (the refit): a scaler + logistic regression or MLP pipeline."""
    weight = settings.get("class_weight")
    if kind == "linear":
        return fit_linear(x, y, settings["C"], weight)
    return fit_mlp(x, y, settings["alpha"], settings.get("hidden", 256), seed=seed, class_weight=weight)


def finetune_size(sides: np.ndarray, crop: int) -> int:
    """The fine-tuning input size the data asks for: the median short side of the images, rounded up to
    a multiple of 32, clamped to [96, the backbone's crop]. 8x8 scans train at 96 px, photos at the crop."""
    median = float(np.median(sides)) if len(sides) else float(crop)
    size = int(np.ceil(median / SIZE_STEP) * SIZE_STEP)
    return int(min(max(size, MIN_FINETUNE_SIZE), crop))


def data_image_size(params: Any, manifest: Any) -> int:
    """``train.finetune.image_size``, or when null the size :func:`finetune_size` derives from the
    train+val images for the configured backbone."""
    from graft.backbones import describe_backbone

    if params.train.finetune.image_size:
        return int(params.train.finetune.image_size)
    fp = params.featurize
    crop = int(describe_backbone(fp.backbone, fp.weights)["crop"])
    rows = manifest[manifest["split"].isin(["train", "val"])]
    return finetune_size(rows[["width", "height"]].min(axis=1).to_numpy(), crop)


def finetune_seconds(forward_s_per_image: float, n_train: int, n_val: int, epochs: int) -> float:
    """Expected wall time of fine-tuning: a training step costs about three forward passes (backward ~2x),
    plus one forward pass over val per epoch."""
    return forward_s_per_image * epochs * (3 * n_train + n_val)


def onnx_cost(model: torch.nn.Module, size: int, runs: int = 10) -> tuple[int, float]:
    """(bytes, median batch-1 ms) of ``model`` exported to ONNX in memory and run by onnxruntime."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.rand(1, 3, size, size),),
            buf,  # type: ignore[arg-type]  # torch writes to a file-like object; its hint names paths only
            input_names=["image"],
            output_names=["probabilities"],
            opset_version=17,
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        sess.run(None, {"image": x})
        if i >= 2:  # warm-up runs
            times.append(time.perf_counter() - t0)
    return len(buf.getvalue()), round(float(np.median(times)) * 1e3, 3)


def probe_features(
    model: torch.nn.Module,
    paths: list[str],
    pp: Preprocess,
    batch_size: int = 64,
    workers: int = 2,
    amp: torch.dtype | None = None,
) -> tuple[np.ndarray, float]:
    """Pooled features of ``paths`` at ``pp`` (for the linear probe LP-FT starts from), and seconds per image;
    ``amp``: the CPU autocast dtype the fine-tune trains in (Lite0's forward pass is 2.2x faster in bf16; its
    activations then run out of place, as in training: :func:`graft.precision.out_of_place_activations`)."""
    from graft.batches import image_batches
    from graft.memory import keep_freed_memory
    from graft.precision import out_of_place_activations

    t0 = time.perf_counter()
    out = []
    model.eval()
    autocast = torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)
    with keep_freed_memory(), out_of_place_activations(model, amp is not None), torch.inference_mode(), autocast:
        for _, x in image_batches(paths, pp, batch_size, workers):
            out.append(model(x).float().numpy())  # x: channels_last already
    seconds = (time.perf_counter() - t0) / max(len(paths), 1)
    return np.concatenate(out), seconds


def backbone_features(fp: Any, manifest: Any, root: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The last-layer features of another backbone for the manifest's images, through its own cache folder
    (computed for the images it does not hold yet): what ``other_backbones`` candidates read."""
    import json

    from graft.cache import plan_cache, read_features
    from graft.engine import fill_cache

    plan = plan_cache(fp, manifest)
    fill_cache(fp, plan, root)
    table = read_features(plan.cache, plan.dim, plan.shas)
    matrix = table["feature"].combine_chunks().flatten().to_numpy().reshape(-1, plan.dim)
    meta = {"graft.backbone": plan.name, "graft.description": json.dumps(plan.description, sort_keys=True)}
    return dict(zip(table["sha256"].to_pylist(), matrix, strict=True)), meta


LEADERBOARD_COLUMNS = ["candidate", "score", "se", "cv_std", "scored_on", "settings", "onnx_bytes", "chosen", "note"]
# Wall-clock figures differ on every run: a DVC output holding them would be "modified" after each `graft run`.
TIMING_COLUMNS = ["candidate", "train_seconds", "latency_ms_batch_1"]


def write_leaderboard(metrics_dir: str | Path, rows: list[dict]) -> Path:
    """``<metrics_dir>/leaderboard.csv``: one row per candidate the train stage considered (best score first).

    Its times go to ``leaderboard_timings.csv`` beside it (not a DVC output: they change on every run).
    """
    import pandas as pd

    from graft.atomic import write_csv

    frame = pd.DataFrame(rows)
    order = frame.reindex(columns=["score"]).sort_values("score", ascending=False, na_position="last", kind="stable")
    write_csv(Path(metrics_dir) / "leaderboard_timings.csv", frame.reindex(columns=TIMING_COLUMNS).loc[order.index])
    return write_csv(Path(metrics_dir) / "leaderboard.csv", frame.reindex(columns=LEADERBOARD_COLUMNS).loc[order.index])
