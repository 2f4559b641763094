"""Fine-tune (parameter transfer): copy pretrained weights, replace the classifier, train some or all layers.

Strategies (``train.finetune.strategy``):
  * ``head``: backbone frozen, head trained end to end on augmented images
  * ``last_n``: the last ``last_n`` blocks of the backbone are trained with the head
  * ``full``: everything is trained
  * ``staged``: ``head_epochs`` with the backbone frozen, then unfreeze (``last_n`` blocks, or all)

The training loop, learning-rate groups and augmentation are :mod:`graft.tune`; this stage builds
the starting model (pretrained, or ``train.init_from``), keys the run for resuming, and writes
``models/model.pt``, ``train.json`` and the curves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from graft import GraftError
from graft.atomic import write_json
from graft.auto import data_image_size, write_leaderboard
from graft.backbones import Backbone
from graft.cache import cached_pooled_features
from graft.dataset import read_classes, read_manifest, split_items
from graft.lpft import probe_start
from graft.model import Classifier, head_config, initial_model, run_key, save_model
from graft.params import Params
from graft.plots import write_curves
from graft.tasks import stage_task
from graft.trust import calibrate
from graft.tune import fit, predict_logits, read_checkpoint

# --- the model to start from


def finetune(params: Params, on_epoch_end: Callable[[int], None] | None = None, resume: bool | None = None) -> dict:
    """Run the train stage in finetune mode; write ``models/model.pt`` (kind ``finetune``).

    Args:
        params: the pipeline params.
        on_epoch_end: called with the epoch number after each checkpoint (tests use it to interrupt).
        resume: True requires a matching checkpoint; False starts fresh; None resumes when one matches.
    """
    tp, fp = params.train, params.train.finetune
    manifest = read_manifest(params.data.out_dir)
    classes = read_classes(params.data.out_dir)
    train_items, val_items = (split_items(manifest, params.data.root, classes, s) for s in ("train", "val"))

    torch.manual_seed(params.seed)  # the new head's initial weights
    model, bb, note = initial_model(params, classes, data_image_size(params, manifest))
    key = run_key(params, manifest, bb.fingerprint)
    checkpoint = Path(tp.model_dir) / "checkpoints" / "last.pt"
    if resume is False:
        checkpoint.unlink(missing_ok=True)
    resuming = (read_checkpoint(checkpoint) or {}).get("key") == key
    if resume and not resuming:
        raise GraftError(f"--resume: no checkpoint of this configuration at {checkpoint}")
    fp = fp.model_copy(update={"image_size": bb.preprocess.crop})  # the size it runs at (and its run key)
    if fp.init == "probe" and note["head"] != "loaded":
        # LP-FT: the classifier starts from the fitted probe, so no head-only epochs are needed; a resumed run
        # has that head in its checkpoint already
        if not resuming:
            # the pipeline's feature table holds these features when featurize ran this backbone at this size
            shas = manifest.loc[manifest["split"] == "train", "sha256"].tolist()
            cached = None if tp.init_from else cached_pooled_features(params.featurize.out, bb.describe(), shas)
            note["probe_C"] = probe_start(
                model, train_items, len(classes), bb.preprocess, fp.workers, params.seed, None, fp.precision, cached
            )
            note["probe_features"] = "feature cache" if cached is not None else "computed"
        new = note["head"] == "new"
        note["head"] = "linear probe (LP-FT)" if new else f"{note['head']}, from a linear probe (LP-FT)"
        fp = fp.model_copy(update={"head_epochs": 0})
    best, history, val_logits = fit(
        model,
        train_items,
        val_items,
        bb.preprocess,
        fp,
        len(classes),
        params.seed,
        checkpoint,
        key,
        tp.class_weights,
        on_epoch_end,
    )
    payload = {
        "kind": "finetune",
        "classes": classes,
        "backbone": {
            "name": bb.name,
            "weights": params.featurize.weights,
            "image_size": fp.image_size,
            "fingerprint": bb.fingerprint,
        },
        "head": head_config("logreg", bb.feature_dim, tp.hidden, tp.dropout),
        "state_dict": best,
        "history": history,
        "init": note,
        "calibration": _calibration(
            model, best, val_items if len(val_items[0]) else train_items, bb, params, val_logits
        ),
    }
    save_model(Path(tp.model_dir) / "model.pt", payload)
    checkpoint.unlink(missing_ok=True)  # the run is complete: the next one starts fresh
    best_row = min(history, key=lambda h: h["val_loss"])
    summary = {
        "mode": "finetune",
        "strategy": fp.strategy,
        "epochs": len(history),
        "best_epoch": best_row["epoch"],
        "val_loss": round(best_row["val_loss"], 4),
        "val_accuracy": round(best_row["val_accuracy"], 4),
        "image_size": bb.preprocess.crop,
        "train_images": len(train_items[0]),
        **note,
    }
    write_json(Path(params.evaluate.metrics_dir) / "train.json", summary)
    write_curves(history, params.evaluate.metrics_dir)
    write_leaderboard(
        params.evaluate.metrics_dir,
        [
            {  # one candidate: the one train.mode names
                "candidate": "finetune",
                "chosen": True,
                "scored_on": f"val split (n={len(val_items[0])})",
                "note": "train.mode: finetune (no selection)",
                "settings": json.dumps({"strategy": fp.strategy, "image_size": bb.preprocess.crop}),
            }
        ],
    )
    return summary


def _calibration(
    model: Classifier, state: dict, items: tuple, bb: Backbone, params: Params, logits: np.ndarray | None
) -> dict:
    """Temperature and unknown threshold from the best weights' logits on held-out images (val): those the fit
    computed at the best epoch (in the training precision, bf16 in a bf16 run), else a pass over the images."""
    if logits is None:
        model.load_state_dict(state)
        logits = predict_logits(model, items[0], bb.preprocess, workers=params.train.finetune.workers)
    return calibrate(logits, items[1], params.predict.accept_rate, params.predict.unknown_score)


finetune_task = stage_task(finetune, "finetune")
