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

import hashlib
import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from graft import GraftError
from graft.atomic import write_json
from graft.backbones import Backbone, build_backbone
from graft.dataset import read_classes, read_manifest, split_items
from graft.model import Classifier, head_config, load_model, make_head, save_model
from graft.params import Params
from graft.plots import write_curves
from graft.tasks import stage_task
from graft.tune import fit, read_checkpoint


# --- the model to start from


def initial_model(params: Params, classes: list[str]) -> tuple[Classifier, Backbone, dict]:
    """The pretrained backbone with a new head, or an earlier graft model (``train.init_from``).

    Returns the model, its backbone, and a note of what was loaded.
    """
    fp, tp = params.train.finetune, params.train
    name, weights = params.featurize.backbone, params.featurize.weights
    source = load_model(tp.init_from) if tp.init_from else None
    if source and source["backbone"]["name"] != name:
        raise GraftError(f"train.init_from {tp.init_from} has backbone {source['backbone']['name']!r}, "
                         f"but featurize.backbone is {name!r}: use the same backbone")
    bb = build_backbone(name, weights, fp.image_size)
    head = make_head(head_config("logreg", bb.feature_dim, tp.hidden, tp.dropout), len(classes))
    model = Classifier(bb.model, head)
    note = {"init": "pretrained backbone", "head": "new"}
    if source:
        own = model.state_dict()
        state = source["state_dict"] if source["kind"] == "finetune" else {f"head.{k}": v for k, v in source["state_dict"].items()}
        same_classes = source["classes"] == classes and source["head"]["kind"] == "logreg"
        load = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and (same_classes or not k.startswith("head."))}
        model.load_state_dict(load, strict=False)
        note = {"init": str(tp.init_from), "loaded_tensors": len(load),
                "head": "loaded" if same_classes else f"rebuilt for {len(classes)} classes (source had {len(source['classes'])})"}
    return model, bb, note


# --- the loop


def run_key(params: Params, manifest: pd.DataFrame, fingerprint: str) -> str:
    """Identifies a training run: a checkpoint resumes only a run with the same key."""
    blob = json.dumps({"train": params.train.model_dump(mode="json"), "seed": params.seed, "fp": fingerprint,
                       "data": sorted(zip(manifest["sha256"], manifest["label"], manifest["split"]))})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    model, bb, note = initial_model(params, classes)
    key = run_key(params, manifest, bb.fingerprint)
    checkpoint = Path(tp.model_dir) / "checkpoints" / "last.pt"
    if resume is False:
        checkpoint.unlink(missing_ok=True)
    elif resume and (read_checkpoint(checkpoint) or {}).get("key") != key:
        raise GraftError(f"--resume: no checkpoint of this configuration at {checkpoint}")
    best, history = fit(model, train_items, val_items, bb.preprocess, fp, len(classes), params.seed,
                        checkpoint, key, tp.class_weights, on_epoch_end)
    payload = {
        "kind": "finetune",
        "classes": classes,
        "backbone": {"name": bb.name, "weights": params.featurize.weights, "image_size": fp.image_size,
                     "fingerprint": bb.fingerprint},
        "head": head_config("logreg", bb.feature_dim, tp.hidden, tp.dropout),
        "state_dict": best,
        "history": history,
        "init": note,
    }
    save_model(Path(tp.model_dir) / "model.pt", payload)
    checkpoint.unlink(missing_ok=True)  # the run is complete: the next one starts fresh
    best_row = min(history, key=lambda h: h["val_loss"])
    summary = {"mode": "finetune", "strategy": fp.strategy, "epochs": len(history), "best_epoch": best_row["epoch"],
               "val_loss": round(best_row["val_loss"], 4), "val_accuracy": round(best_row["val_accuracy"], 4),
               "image_size": bb.preprocess.crop, "train_images": len(train_items[0]), **note}
    write_json(Path(params.evaluate.metrics_dir) / "train.json", summary)
    write_curves(history, params.evaluate.metrics_dir, params.evaluate.plots_dir)
    return summary


finetune_task = stage_task(finetune, "finetune")
