"""Fault rows 21 and 27: ONNX numeric drift, and labels/paths with spaces, quotes and non-ASCII end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

import graft.tasks.export
from graft import GraftError
from graft.cli import main
from graft.model import Serving, classifier_from_payload, load_model
from graft.predict import OnnxClassifier, list_images, predict_files
from graft.tasks.evaluate import evaluate
from graft.tasks.export import check_against_torch, check_images, export
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.faults.helpers import params_for, tmp_files
from tests.helpers import class_image

CLASSES = ('chat "noir" é', "l'oiseau 🐦 bleu", "back\\slash & <tag>")
NO_INT8 = {"export": {"quantize": None}, "train": {"max_epochs": 60}}
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # matplotlib lacks emoji glyphs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """Odd class folders and file names, through ingest, featurize, train, evaluate and export (once per module)."""
    root = tmp_path_factory.mktemp("odd names") / "work space «ü»"
    for ci, c in enumerate(CLASSES):
        (root / "raw" / c).mkdir(parents=True)
        for i in range(10):
            class_image(ci, i).save(root / "raw" / c / f"photo {i} 'q' \"dq\" ü.png")
    params = params_for(root, NO_INT8)
    ingest(params)
    featurize(params)
    train(params)
    metrics = evaluate(params)
    summary = export(params)
    return root, params, metrics, summary


def test_odd_labels_and_paths_work_end_to_end_including_onnx_metadata(exported, capsys) -> None:
    """Every stage keeps the exact labels; ONNX metadata holds them as JSON; `graft predict` writes them back."""
    root, params, metrics, _ = exported
    manifest = pd.read_parquet(root / "data/manifest.parquet")
    assert set(manifest["label"]) == set(CLASSES) and len(manifest) == 30
    assert all((root / "raw" / p).is_file() for p in manifest["path"])
    assert set(metrics["model"]["per_class"]) == set(CLASSES)
    meta = {p.key: p.value for p in onnx.load(params.export.out).metadata_props}
    assert json.loads(meta["graft.classes"]) == sorted(CLASSES)
    served = OnnxClassifier(params.export.out)
    assert served.classes == sorted(CLASSES)
    out_csv = root / "predictions «ü».csv"

    rc = main(["predict", str(root / "raw"), "--model", params.export.out, "--out", str(out_csv)])

    assert rc == 0
    with open(out_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and {r["best_guess"] for r in rows} <= set(CLASSES)
    by_path = {Path(r["path"]).relative_to(root / "raw").as_posix(): r["best_guess"] for r in rows}
    assert set(by_path) == set(manifest["path"])
    assert (
        sum(by_path[p] == lbl for p, lbl in zip(manifest["path"], manifest["label"], strict=True)) >= 20
    )  # it learned something
    recs = list(predict_files(served, list_images(root / "raw")[:3]))
    assert all(r["error"] is None and r["best_guess"] in CLASSES for r in recs)
    capsys.readouterr()


def _perturbing(real_export_onnx):
    """export_onnx that writes the real graph, then nudges one weight: the published file no longer matches torch."""

    def export_onnx(model, path, size, opset, metadata):
        real_export_onnx(model, path, size, opset, metadata)
        proto = onnx.load(str(path))
        init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight tensor
        arr = numpy_helper.to_array(init).copy()
        arr += 0.05
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(proto, str(path))

    return export_onnx


def test_onnx_numeric_drift_fails_loudly_and_keeps_the_previous_model(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that drifts from torch is caught by the onnxruntime check; the published model is untouched."""
    root, _, _, _ = exported
    work = tmp_path / "w"
    shutil.copytree(root, work)
    params = params_for(work, NO_INT8)
    before = Path(params.export.out).read_bytes()
    monkeypatch.setattr(graft.tasks.export, "export_onnx", _perturbing(graft.tasks.export.export_onnx))

    with pytest.raises(
        GraftError, match=r"^ONNX export drifts from torch at batch_1: max \|dp\| = .* > export\.atol=0\.0001$"
    ):
        export(params)

    assert Path(params.export.out).read_bytes() == before
    assert tmp_files(work / "models") == []


class _DriftsAtBatchN(torch.nn.Module):
    """The real exported graph (probabilities, score), except that batches of more than one image get
    shifted probabilities."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, score = self.model(x)
        return (p, score) if x.shape[0] == 1 else (p + 1e-3, score)


def test_drift_only_at_batch_n_is_caught_too(exported) -> None:
    """The check runs batch 1 and batch N: a difference that shows only in a batch is still an error."""
    root, params, _, _ = exported
    model, bb = classifier_from_payload(load_model(Path(params.train.model_dir) / "model.pt"))
    images = check_images(pd.read_parquet(root / "data/manifest.parquet"), root / "raw", bb.preprocess, 8)

    payload = load_model(Path(params.train.model_dir) / "model.pt")
    serving = Serving(model, payload["calibration"]["unknown"]["score"]).eval()  # what export writes
    report = check_against_torch(Path(params.export.out), serving, images, 1e-4)
    with pytest.raises(GraftError, match=r"drifts from torch at batch_8: max \|dp\| = 1\.00e-03"):
        check_against_torch(Path(params.export.out), _DriftsAtBatchN(serving), images, 1e-4)

    assert set(report) == {"batch_1", "batch_8"} and max(report.values()) <= 1e-4
