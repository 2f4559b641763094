"""The graft model file: one format for both kinds of transfer, loaded safely.

``models/model.pt`` is a plain dict saved with ``torch.save`` and read with
``torch.load(weights_only=True)``. ``kind`` says what ``state_dict`` holds:

* ``head``: only the :class:`Head` (feature transfer; the backbone is rebuilt from the registry)
* ``finetune``: the whole :class:`Classifier` (backbone and head, parameter transfer)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from graft import GraftError
from graft.atomic import write_torch
from graft.backbones import Backbone, build_backbone
from graft.ensemble_head import EnsembleHead
from graft.params import FeaturizeParams, Params
from graft.taps import FeatureExtractor

MODEL_FORMAT = "graft-model/1"


class Head(nn.Module):
    """Standardise features, then a linear layer (``logreg``) or a one-hidden-layer MLP."""

    mean: torch.Tensor  # buffers, declared for the type checker (register_buffer sets them)
    std: torch.Tensor

    def __init__(self, dim: int, n_classes: int, kind: str = "logreg", hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        self.n_classes = n_classes
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "logreg":
            self.net = nn.Sequential(nn.Linear(dim, n_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
            )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net((f - self.mean) / self.std)


class Classifier(nn.Module):
    """Images in [0, 1] -> class probabilities: features, head, softmax of the logits over ``temperature``.

    ``temperature`` is a plain float (1 until calibrated), not a buffer: state dicts stay as they were.
    """

    def __init__(self, features: FeatureExtractor, head: Head | EnsembleHead):
        super().__init__()
        self.features, self.head = features, head
        self.temperature = 1.0

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image) / self.temperature, dim=1)


class Serving(nn.Module):
    """The exported graph: calibrated probabilities and the in-distribution score, the energy
    ``T * logsumexp(logits / T)`` or the max softmax probability; below the threshold in the metadata the
    answer is "unknown"."""

    def __init__(self, model: Classifier, score: str = "energy"):
        super().__init__()
        self.model, self.score = model, score

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.logits(image) / self.model.temperature
        proba = torch.softmax(z, dim=1)
        if self.score == "msp":
            return proba, proba.max(dim=1).values
        return proba, self.model.temperature * torch.logsumexp(z, dim=1)


def head_config(kind: str, dim: int, hidden: int, dropout: float) -> dict:
    return {"kind": kind, "dim": int(dim), "hidden": int(hidden), "dropout": float(dropout)}


def make_head(cfg: dict, n_classes: int) -> Head | EnsembleHead:
    if cfg["kind"] == "ensemble":  # auto's ensemble candidate: a head per member (graft.ensemble)
        members = cfg["members"]
        return EnsembleHead([make_head(m, n_classes) for m in members], [m["dim"] for m in members], n_classes)
    return Head(cfg["dim"], n_classes, cfg["kind"], cfg["hidden"], cfg["dropout"])


def save_model(path: str | Path, payload: dict) -> None:
    """Write a model file atomically (a crash never leaves half a model at ``path``)."""
    write_torch(path, {"format": MODEL_FORMAT, **payload})


def load_model(path: str | Path) -> dict:
    """Load a graft model file safely (``weights_only=True``: tensors and plain containers only).

    ``path`` may be the file or a folder holding ``model.pt``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GraftError(f"model {p} not found: run the train stage first") from None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise GraftError(f"cannot load model {p}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise GraftError(f"{p} is not a graft model (format {MODEL_FORMAT})")
    problem = _payload_problem(payload)
    if problem:
        raise GraftError(f"{p} is not a usable graft model: {problem}; retrain it or use another file")
    return payload


_HEAD_KEYS = ("kind", "dim", "hidden", "dropout")


def _payload_problem(payload: dict) -> str | None:
    """What is wrong with a loaded model file's fields, or None: every reader may then index them freely
    (a file like ``{"format": "graft-model/1"}`` or a state dict holding a number would otherwise fail deep
    inside, as a KeyError or AttributeError)."""
    for key, kind in (("kind", str), ("classes", list), ("backbone", dict), ("head", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if payload["kind"] not in ("head", "finetune"):
        return f"kind {str(payload['kind'])[:40]!r} is neither 'head' nor 'finetune'"
    if not payload["classes"] or not all(isinstance(c, str) for c in payload["classes"]):
        return "'classes' must be a non-empty list of names"
    if not isinstance(payload["backbone"].get("name"), str):
        return "'backbone' has no name"
    parts = [("", payload)] + ([("final ", payload["final"])] if payload.get("final") else [])
    for where, part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("state_dict"), dict):
            return f"{where}'state_dict' is missing"
        if not isinstance(part.get("head"), dict) or not all(k in part["head"] for k in _HEAD_KEYS):
            return f"{where}'head' must name {', '.join(_HEAD_KEYS)}"
        members = part["head"].get("members")
        if part["head"]["kind"] == "ensemble" and not (
            isinstance(members, list) and all(isinstance(m, dict) and set(_HEAD_KEYS) <= set(m) for m in members)
        ):
            return f"{where}'head' of an ensemble must list its members' heads"
        for name, value in part["state_dict"].items():
            if not isinstance(value, torch.Tensor):
                return f"{where}state_dict entry {str(name)[:60]!r} is a {type(value).__name__}, not a tensor"
    return None


def trained(payload: dict, final: bool = False) -> dict:
    """The ``head`` config and ``state_dict`` of a model file: the evaluated model, or with ``final`` the one
    refit on every image for export (``train.refit: all``) when the file has one."""
    part = payload.get("final") if final else None
    return part or {"head": payload["head"], "state_dict": payload["state_dict"]}


def head_from_payload(payload: dict, final: bool = False) -> Head | EnsembleHead:
    """The trained head of a model file (feature transfer, or the classifier of a fine-tuned one)."""
    part = trained(payload, final)
    head = make_head(part["head"], len(payload["classes"]))
    state = part["state_dict"]
    if payload["kind"] == "finetune":
        state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    head.load_state_dict(state)
    return head.eval()


def model_name(payload: dict) -> str:
    """A reader's name for the model: what it reads and how it was trained."""
    b = payload["backbone"]
    taps = b.get("taps", ["last"])
    head = trained(payload)["head"]
    kind = head["kind"]
    if kind == "ensemble":
        names = ", ".join(str(m.get("name", m["kind"])) for m in head["members"])
        return f"{b['name']} features: mean of {len(head['members'])} heads ({names})"
    if payload["kind"] == "finetune":
        size = b.get("image_size")
        return f"{b['name']} fine-tuned" + (f" at {size} px" if size else "")
    if taps == ["raw"]:
        side = b.get("raw_size", 16)
        return f"raw pixels {side}x{side} grey + {kind}"
    reads = {("last",): "", ("stages",): " multi-layer", ("raw", "stages"): " multi-layer + raw pixels"}
    return f"{b['name']}{reads.get(tuple(taps), ' ' + '+'.join(taps))} + {kind} head"


def backbone_entry(fp: FeaturizeParams, taps: tuple[str, ...] | list[str], image_size: int | None = None) -> dict:
    """The model file's ``backbone`` entry: what rebuilds the feature extractor this head was trained on."""
    from graft.backbones import describe_backbone, fingerprint_of

    size = image_size or fp.image_size
    taps = tuple(taps)
    return {
        "name": fp.backbone,
        "weights": fp.weights,
        "image_size": size,
        "taps": list(taps),
        "raw_size": fp.raw_size,
        "fingerprint": fingerprint_of(describe_backbone(fp.backbone, fp.weights, size, taps, fp.raw_size)),
    }


def backbone_from_payload(payload: dict) -> Backbone:
    b = payload["backbone"]
    return build_backbone(
        b["name"], b.get("weights"), b.get("image_size"), tuple(b.get("taps", ("last",))), b.get("raw_size", 16)
    )


def classifier_from_payload(
    payload: dict, backbone: Backbone | None = None, final: bool = False
) -> tuple[Classifier, Backbone]:
    """Rebuild the full image classifier (either kind) in eval mode; ``final``: the export's refit, if any."""
    bb = backbone or backbone_from_payload(payload)
    if payload["kind"] == "head":
        want = payload["backbone"].get("fingerprint")
        if want and want != bb.fingerprint:
            raise GraftError(
                f"backbone fingerprint {bb.fingerprint} differs from the one the model was trained on "
                f"({want}): rerun featurize and train"
            )
        model = Classifier(bb.model, head_from_payload(payload, final))
    else:
        part = trained(payload, final)
        model = Classifier(bb.model, make_head(part["head"], len(payload["classes"])))
        model.load_state_dict(part["state_dict"])
    model.temperature = float(payload.get("calibration", {}).get("temperature", 1.0))
    return model.eval(), bb


# --- the starting point of fine-tuning


def initial_model(
    params: Params, classes: list[str], image_size: int | None = None
) -> tuple[Classifier, Backbone, dict]:
    """The pretrained backbone with a new head, or an earlier graft model (``train.init_from``).

    Returns the model, its backbone, and a note of what was loaded.
    """
    tp = params.train
    name, weights = params.featurize.backbone, params.featurize.weights
    source = load_model(tp.init_from) if tp.init_from else None
    if source and source["backbone"]["name"] != name:
        raise GraftError(
            f"train.init_from {tp.init_from} has backbone {source['backbone']['name']!r}, "
            f"but featurize.backbone is {name!r}: use the same backbone"
        )
    bb = build_backbone(name, weights, image_size)
    head = make_head(head_config("logreg", bb.feature_dim, tp.hidden, tp.dropout), len(classes))
    model = Classifier(bb.model, head)
    note: dict[str, str | int] = {"init": "pretrained backbone", "head": "new"}
    if source:
        own = model.state_dict()
        state = (
            source["state_dict"]
            if source["kind"] == "finetune"
            else {f"head.{k}": v for k, v in source["state_dict"].items()}
        )
        same_classes = source["classes"] == classes and source["head"]["kind"] == "logreg"
        load = {
            k: v
            for k, v in state.items()
            if k in own and own[k].shape == v.shape and (same_classes or not k.startswith("head."))
        }
        model.load_state_dict(load, strict=False)
        note = {
            "init": str(tp.init_from),
            "loaded_tensors": len(load),
            "head": "loaded"
            if same_classes
            else f"rebuilt for {len(classes)} classes (source had {len(source['classes'])})",
        }
    return model, bb, note


def run_key(params: Params, manifest: pd.DataFrame, fingerprint: str) -> str:
    """Identifies a training run: a checkpoint resumes only a run with the same key."""
    blob = json.dumps(
        {
            # how often checkpoints are written does not change what the run computes
            "train": params.train.model_dump(mode="json", exclude={"finetune": {"checkpoint_seconds"}}),
            "seed": params.seed,
            "fp": fingerprint,
            "data": sorted(zip(manifest["sha256"], manifest["label"], manifest["split"], strict=True)),
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
