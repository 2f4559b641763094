"""Tests for tasks.export: one checked ONNX graph with graft metadata, published only when it matches torch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

import tasks.export
from graft import GraftError
from graft.images import load_batch
from graft.model import classifier_from_payload, load_model
from tasks.evaluate import evaluate
from tasks.export import data_hash, export
from tasks.featurize import featurize
from tasks.ingest import ingest
from tasks.train_head import train
from tests.conftest import make_params, write_tree

CLASSES = ("cat", 'chat "noir" é', "dog")  # a label with spaces, quotes and non-ASCII must survive


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the tiny models on one thread: steady timings when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A workspace after ingest, featurize, train and export on tiny_cnn (built once for this module)."""
    root = tmp_path_factory.mktemp("export")
    (root / "raw").mkdir()
    write_tree(root / "raw", CLASSES, per_class=14)
    params = make_params(root, {"train": {"max_epochs": 80}})
    ingest(params)
    featurize(params)
    train(params)
    summary = export(params)
    return root, params, summary


def _session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session for ``path``."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_reference(root: Path, params, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` preprocessed manifest images and the torch model's probabilities for them."""
    model, bb = classifier_from_payload(load_model(Path(params.train.model_dir) / "model.pt"))
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    x = load_batch([root / "raw" / p for p in manifest["path"].head(n)], bb.preprocess)
    with torch.no_grad():
        return x, model(torch.from_numpy(x)).numpy()


def test_onnx_passes_checker(exported) -> None:
    """The published model is accepted by onnx.checker (full check) and has the documented I/O."""
    root, params, summary = exported
    path = Path(params.export.out)
    assert summary["onnx"] == str(path)
    assert summary["bytes"] == path.stat().st_size
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    assert all(v <= params.export.atol for v in summary["max_abs_diff"].values())


def test_metadata(exported) -> None:
    """metadata_props carry the classes (exactly, non-ASCII included), input spec, backbone and hashes."""
    root, params, _ = exported
    meta = {p.key: p.value for p in onnx.load(params.export.out).metadata_props}
    classes = json.loads((root / "data" / "classes.json").read_text(encoding="utf-8"))["classes"]
    assert json.loads(meta["graft.classes"]) == classes == sorted(CLASSES)
    assert 'chat "noir" é' in json.loads(meta["graft.classes"])
    _, bb = classifier_from_payload(load_model(root / "models" / "model.pt"))
    spec = json.loads(meta["graft.input"])
    assert (spec["height"], spec["width"], spec["resize_shorter_side"]) == (bb.preprocess.crop, bb.preprocess.crop,
                                                                            bb.preprocess.resize)
    assert spec["mean"] == pytest.approx(list(bb.preprocess.mean))
    assert spec["std"] == pytest.approx(list(bb.preprocess.std))
    assert spec["interpolation"] == bb.preprocess.interpolation
    assert meta["graft.backbone"] == "tiny_cnn"
    assert meta["graft.fingerprint"] == bb.fingerprint
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    assert re.fullmatch(r"[0-9a-f]{64}", meta["graft.data_sha256"])
    assert meta["graft.data_sha256"] == data_hash(manifest)
    relabelled = manifest.assign(label=manifest["label"].where(manifest.index != 0, "other"))
    assert data_hash(relabelled) != meta["graft.data_sha256"]


def test_session_sees_metadata(exported) -> None:
    """onnxruntime reads the same class list back from the model's custom metadata."""
    _, params, _ = exported
    meta = _session(Path(params.export.out)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["graft.classes"]) == sorted(CLASSES)


def test_dynamic_batch_and_matches_torch(exported) -> None:
    """The batch axis is dynamic (batch 1 and 5 both run) and ORT matches torch within 1e-4."""
    root, params, _ = exported
    proto = onnx.load(params.export.out)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    x, ref = _torch_reference(root, params, 5)
    sess = _session(Path(params.export.out))
    for n in (1, 5):
        got = sess.run(["probabilities"], {"image": x[:n]})[0]
        assert got.shape == (n, len(CLASSES))
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
        assert float(np.abs(got - ref[:n]).max()) <= 1e-4


def _copy_workspace(root: Path, dst: Path):
    """A private copy of the exported workspace and params pointing into it."""
    shutil.copytree(root, dst)
    return make_params(dst, {"train": {"max_epochs": 80}})


def _always_drifts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the numeric check fail for real: the true comparison with a tolerance nothing can meet."""
    real = tasks.export.check_against_torch
    monkeypatch.setattr(tasks.export, "check_against_torch",
                        lambda path, model, images, atol: real(path, model, images, -1.0))


def test_failed_check_keeps_previous_model(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the ORT-vs-torch check fails, export raises and the previous model.onnx is untouched."""
    root, _, _ = exported
    params = _copy_workspace(root, tmp_path / "w")
    out = Path(params.export.out)
    before = out.read_bytes()
    _always_drifts(monkeypatch)
    with pytest.raises(GraftError, match="drifts from torch"):
        export(params)
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_failed_check_publishes_nothing(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a previous model, a failed check leaves no file at the final path."""
    root, _, _ = exported
    params = _copy_workspace(root, tmp_path / "w")
    out = Path(params.export.out)
    out.unlink()
    _always_drifts(monkeypatch)
    with pytest.raises(GraftError):
        export(params)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        p.name for p in (root / "models").iterdir() if p.name != out.name)


def test_stale_backbone_is_refused(exported, tmp_path: Path) -> None:
    """A model whose recorded backbone fingerprint differs from the rebuilt one is not exported."""
    root, _, _ = exported
    params = _copy_workspace(root, tmp_path / "w")
    model_pt = Path(params.train.model_dir) / "model.pt"
    payload = torch.load(model_pt, weights_only=True)
    payload["backbone"]["fingerprint"] = "0" * 16
    torch.save(payload, model_pt)
    before = Path(params.export.out).read_bytes()
    with pytest.raises(GraftError, match="fingerprint"):
        export(params)
    assert Path(params.export.out).read_bytes() == before


def test_evaluate_accepts_the_quoted_label(exported, tmp_path: Path) -> None:
    """The label with quotes and non-ASCII survives evaluate's CSV and report as well."""
    root, _, _ = exported
    params = _copy_workspace(root, tmp_path / "w")
    metrics = evaluate(params)
    assert 'chat "noir" é' in metrics["model"]["per_class"]
    conf = pd.read_csv(Path(params.evaluate.metrics_dir) / "confusion.csv", encoding="utf-8")
    assert set(conf["actual"]) <= set(CLASSES)
