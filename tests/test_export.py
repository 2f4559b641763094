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

import graft.tasks.export
from graft import GraftError
from graft.dataset import data_hash
from graft.images import Preprocess, load_batch
from graft.model import classifier_from_payload, load_model
from graft.predict import PREPROCESS_KEYS, OnnxClassifier
from graft.tasks.evaluate import evaluate
from graft.tasks.export import calibration_paths, export, int8_path
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import assert_seven_bit_weights, make_params, run_stages, write_tree

CLASSES = ("cat", 'chat "noir" é', "dog")  # a label with spaces, quotes and non-ASCII must survive


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A workspace after ingest, featurize, train and export on tiny_cnn (built once for this module)."""
    root = tmp_path_factory.mktemp("export")
    (root / "raw").mkdir()
    write_tree(root / "raw", CLASSES, per_class=14)
    params = make_params(root, {"train": {"max_epochs": 80}})
    summary = run_stages(params, ingest, featurize, train, export)
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
    assert [o.name for o in proto.graph.output] == ["probabilities", "in_distribution"]
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
    assert Preprocess.from_dict({k: spec[k] for k in PREPROCESS_KEYS}) == bb.preprocess  # the one schema
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
    real = graft.tasks.export.check_against_torch
    monkeypatch.setattr(
        graft.tasks.export, "check_against_torch", lambda path, model, images, atol: real(path, model, images, -1.0)
    )


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
        p.name for p in (root / "models").iterdir() if p.name != out.name
    )


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


# --- int8 quantization and export.json


def test_int8_model_beside_fp32_with_metadata(exported) -> None:
    """export.quantize: int8 (the default) writes model.int8.onnx with fp32's graft metadata plus its recipe."""
    root, params, summary = exported
    q = int8_path(params.export.out)
    assert q == Path(params.export.out).with_name("model.int8.onnx")
    assert summary["int8"] == str(q) and q.is_file()
    fp32_meta = {p.key: p.value for p in onnx.load(params.export.out).metadata_props}
    int8_proto = onnx.load(str(q))
    int8_meta = {p.key: p.value for p in int8_proto.metadata_props}
    assert {k: int8_meta[k] for k in fp32_meta} == fp32_meta
    assert json.loads(int8_meta["graft.quantization"])["dtype"] == "int8"
    assert any(n.op_type == "QuantizeLinear" for n in int8_proto.graph.node)
    assert_seven_bit_weights(int8_proto)
    assert [i.name for i in int8_proto.graph.input] == ["image"]
    clf = OnnxClassifier(q)
    assert clf.classes == sorted(CLASSES)
    assert clf.preprocess == OnnxClassifier(params.export.out).preprocess


def test_int8_agrees_with_fp32(exported) -> None:
    """The int8 model's argmax matches fp32's on most manifest images."""
    root, params, _ = exported
    x, ref = _torch_reference(root, params, 40)
    got = _session(int8_path(params.export.out)).run(["probabilities"], {"image": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8


def test_export_json_fields(exported) -> None:
    """metrics/export.json has both models' test accuracy (deterministic: a DVC metric); the batch-1/batch-32
    latencies and the ratios are in reports/export_latency.json, which no DVC metric tracks."""
    root, params, summary = exported
    metrics = json.loads((Path(params.evaluate.metrics_dir) / "export.json").read_text())
    latency = json.loads((Path(params.evaluate.report).parent / "export_latency.json").read_text())
    assert not any("latency" in k or "speedup" in k for m in metrics.values() if isinstance(m, dict) for k in m)
    report = {k: {**v, **latency.get(k, {})} if isinstance(v, dict) else v for k, v in metrics.items()}
    report.update({k: v for k, v in latency.items() if k not in report})
    n_test = pd.read_parquet(root / "data" / "manifest.parquet").query("split == 'test'")["sha256"].nunique()
    for kind in ("fp32", "int8"):
        m = report[kind]
        assert m["test_images"] == n_test > 0
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["latency_ms"]["batch_1"] > 0 and m["latency_ms"]["batch_32"] > 0
        assert m["bytes"] == Path(m["path"]).stat().st_size
    assert report["fp32"]["argmax_agreement_with_fp32"] == 1.0
    assert 0.0 <= report["int8"]["argmax_agreement_with_fp32"] <= 1.0
    assert report["int8_speedup_batch_32"] > 0 and report["int8_speedup_batch_1"] > 0
    assert report["int8_accuracy_drop"] == pytest.approx(
        report["fp32"]["test_accuracy"] - report["int8"]["test_accuracy"], abs=1e-4
    )
    assert report["latency_setup"]["statistic"] == "median"
    assert summary["int8_speedup_batch_32"] == report["int8_speedup_batch_32"]


def test_quantize_null_removes_stale_int8(exported, tmp_path: Path) -> None:
    """With export.quantize: null only fp32 is written and an older model.int8.onnx is removed."""
    root, _, _ = exported
    dst = tmp_path / "w"
    shutil.copytree(root, dst)
    params = make_params(dst, {"train": {"max_epochs": 80}, "export": {"quantize": None}})
    assert int8_path(params.export.out).is_file()
    summary = export(params)
    assert "int8" not in summary
    assert not int8_path(params.export.out).exists()
    report = json.loads((Path(params.evaluate.metrics_dir) / "export.json").read_text())
    assert set(report) == {"fp32"}


def test_calibration_uses_train_split_only(exported) -> None:
    """Calibration images come from the train split, distinct, classes interleaved, at most n."""
    root, params, _ = exported
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    paths = calibration_paths(manifest, root / "raw", 6)
    rel = [p.relative_to(root / "raw").as_posix() for p in paths]
    rows = manifest.set_index("path").loc[rel]
    assert len(rel) == len(set(rel)) == 6
    assert (rows["split"] == "train").all()
    assert set(rows["label"].head(3)) == set(CLASSES)
    assert (
        len(calibration_paths(manifest, root / "raw", 10_000)) == manifest.query("split == 'train'")["sha256"].nunique()
    )


def test_failed_quantization_publishes_neither(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If int8 quantization fails, export raises one line and both previous models stay as they were."""
    import onnxruntime.quantization

    root, _, _ = exported
    params = _copy_workspace(root, tmp_path / "w")
    out, q = Path(params.export.out), int8_path(params.export.out)
    before = (out.read_bytes(), q.read_bytes())

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    with pytest.raises(GraftError) as info:
        export(params)
    assert "int8 quantization failed" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert (out.read_bytes(), q.read_bytes()) == before
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".quantize")] == []
