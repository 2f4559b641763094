"""Tests for graft predict: onnxruntime-only serving that agrees with torch and survives bad files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from graft.cli import main
from graft.images import load_batch
from graft.model import classifier_from_payload, load_model
from graft.predict import OnnxClassifier, list_images
from graft.tasks.export import export
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import class_image, make_params, run_stages, write_tree

CLASSES = ("cat", 'chat "noir" é', "dog")

_RUN_PREDICT = (
    "import sys; from graft.cli import main; "
    "rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """An exported tiny_cnn model and a folder of new images (one corrupt, plus files to ignore)."""
    root = tmp_path_factory.mktemp("predict")
    (root / "raw").mkdir()
    write_tree(root / "raw", CLASSES, per_class=14)
    params = make_params(root, {"train": {"max_epochs": 80}})
    run_stages(params, ingest, featurize, train, export)
    folder = root / "incoming"
    (folder / "sub dir").mkdir(parents=True)
    for ci in range(len(CLASSES)):
        for i in range(2):
            class_image(ci, 500 + i).save(folder / f"new {ci}-{i}.png")
    class_image(0, 600).save(folder / "sub dir" / "é nested.jpg", format="JPEG")
    (folder / "broken.png").write_bytes(b"this is not a PNG at all")
    (folder / ".hidden.png").write_bytes(b"hidden files are skipped")
    (folder / "notes.txt").write_text("not an image")
    return root, params, folder


def _predict_subprocess(folder: Path, model: str, out: Path) -> subprocess.CompletedProcess:
    """Run `graft predict FOLDER --model MODEL --out CSV` in a fresh interpreter that must not import torch."""
    return subprocess.run(
        [sys.executable, "-c", _RUN_PREDICT, "predict", str(folder), "--model", model, "--out", str(out)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )


@pytest.fixture(scope="module")
def predicted(served, tmp_path_factory: pytest.TempPathFactory):
    """The CSV written by `graft predict` run in a fresh interpreter, and the process result."""
    root, params, folder = served
    out = tmp_path_factory.mktemp("predict-out") / "predictions.csv"
    proc = _predict_subprocess(folder, params.export.out, out)
    return proc, out


def test_predict_exits_zero_without_torch(predicted) -> None:
    """graft predict exits 0 and never imports torch."""
    proc, out = predicted
    assert proc.returncode == 0, proc.stderr
    assert "torch imported" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.is_file()
    assert proc.stderr.strip().splitlines()[-1] == f"7 predicted, 1 unreadable, written to {out}"


def test_predict_csv_rows_and_labels(served, predicted) -> None:
    """One CSV row per image file (hidden and non-image files skipped), labels among the classes."""
    root, _, folder = served
    _, out = predicted
    rows = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    assert list(rows.columns) == ["path", "predicted", "confidence", "best_guess", "in_distribution", "error"]
    names = sorted(Path(p).name for p in rows["path"])
    assert names == sorted(
        [
            "new 0-0.png",
            "new 0-1.png",
            "new 1-0.png",
            "new 1-1.png",
            "new 2-0.png",
            "new 2-1.png",
            "é nested.jpg",
            "broken.png",
        ]
    )
    good = rows[rows["error"] == ""]
    assert len(good) == 7
    assert set(good["best_guess"]) <= set(CLASSES)
    probs = good["confidence"].astype(float)
    assert ((probs >= 1 / len(CLASSES)) & (probs <= 1.0)).all()


def test_corrupt_image_is_an_error_row(predicted) -> None:
    """The corrupt file gets an error row with no label instead of crashing the run."""
    _, out = predicted
    rows = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    bad = rows[rows["path"].map(lambda p: Path(p).name) == "broken.png"]
    assert len(bad) == 1
    assert bad["predicted"].iloc[0] == "" and bad["confidence"].iloc[0] == ""
    assert "not a recognised image format" in bad["error"].iloc[0]


def test_rows_keep_the_input_order_even_around_a_bad_file(served, predicted) -> None:
    """Rows come out in the order the files were listed; an unreadable file keeps its place."""
    from graft.predict import predict_files

    _, params, folder = served
    _, out = predicted
    rows = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    assert list(rows["path"]) == [str(p) for p in list_images(folder)]
    files = sorted(folder.glob("new *.png"))
    order = [files[0], folder / "broken.png", files[1], files[2]]
    got = list(predict_files(OnnxClassifier(params.export.out), order, batch_size=3))
    assert [r["path"] for r in got] == [str(p) for p in order]
    assert [r["error"] is None for r in got] == [True, False, True, True]


def test_predict_agrees_with_torch(served, predicted) -> None:
    """Every predicted label equals the argmax of the torch model on the same image."""
    root, params, _ = served
    _, out = predicted
    rows = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    good = rows[rows["error"] == ""]
    model, bb = classifier_from_payload(load_model(Path(params.train.model_dir) / "model.pt"))
    classes = load_model(Path(params.train.model_dir) / "model.pt")["classes"]
    x = load_batch(list(good["path"]), bb.preprocess)
    with torch.no_grad():
        proba = model(torch.from_numpy(x)).numpy()
    assert list(good["best_guess"]) == [classes[i] for i in proba.argmax(1)]
    np.testing.assert_allclose(good["confidence"].astype(float), proba.max(1), atol=1e-4)


def test_predict_stdout_lists_every_file(served, tmp_path: Path) -> None:
    """Without --out (or with --print) stdout has one tab-separated line per file, ERROR for the corrupt one."""
    _, params, folder = served
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_PREDICT, "predict", str(folder), "--model", params.export.out],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 8
    errors = [ln for ln in lines if ln.split("\t")[1] == "ERROR"]
    assert len(errors) == 1 and errors[0].split("\t")[0].endswith("broken.png")


def test_classifier_reads_preprocessing_from_metadata(served) -> None:
    """OnnxClassifier takes the classes and preprocessing from the model file alone."""
    root, params, _ = served
    clf = OnnxClassifier(params.export.out)
    _, bb = classifier_from_payload(load_model(Path(params.train.model_dir) / "model.pt"))
    assert clf.classes == sorted(CLASSES)
    assert clf.preprocess == bb.preprocess


def test_list_images_skips_hidden_and_non_images(served) -> None:
    """list_images walks sub-folders and skips hidden and non-image files."""
    _, _, folder = served
    names = [p.name for p in list_images(folder)]
    assert ".hidden.png" not in names and "notes.txt" not in names
    assert "é nested.jpg" in names and len(names) == 8


def test_predict_single_file(served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A single image path is predicted too."""
    _, params, folder = served
    rc = main(["predict", str(folder / "new 1-0.png"), "--model", params.export.out])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    cells = out[0].split("\t")
    assert len(out) == 1 and (cells[1] in CLASSES or (cells[1] == "unknown" and "best guess" in cells[3]))


def test_model_without_metadata_is_refused(served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An ONNX file lacking graft metadata fails with exit 2 and one error line."""
    _, params, folder = served
    proto = onnx.load(params.export.out)
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    rc = main(["predict", str(folder), "--model", str(bare)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("graft: error:") and "no graft metadata" in err[0]


def test_missing_model_is_an_error(served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing model file fails with exit 2 naming it."""
    _, _, folder = served
    missing = tmp_path / "nope.onnx"
    assert main(["predict", str(folder), "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_quoted_label_roundtrips_through_csv(served, tmp_path: Path) -> None:
    """A folder of the quoted, non-ASCII class's training images is read back with that exact label."""
    root, params, _ = served
    src = root / "raw" / 'chat "noir" é'
    folder = tmp_path / "only-chat"
    shutil.copytree(src, folder)
    out = tmp_path / "chat.csv"
    proc = _predict_subprocess(folder, params.export.out, out)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    assert len(rows) == 14
    assert (rows["error"] == "").all()
    assert set(rows["best_guess"]) <= set(CLASSES)
    assert (rows["best_guess"] == 'chat "noir" é').any()
    meta = {m.key: m.value for m in onnx.load(params.export.out).metadata_props}
    assert json.loads(meta["graft.classes"]) == sorted(CLASSES)


def test_below_the_threshold_the_answer_is_unknown(served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The exported graph's in-distribution score against graft.unknown's threshold: a model whose threshold
    is above every score answers "unknown" for each image, with the best guess and the score beside it."""
    import json as _json

    _, params, folder = served
    proto = onnx.load(params.export.out)
    assert [o.name for o in proto.graph.output] == ["probabilities", "in_distribution"]
    meta = {p.key: p for p in proto.metadata_props}
    unknown = _json.loads(meta["graft.unknown"].value)
    assert unknown["score"] in ("energy", "msp") and unknown["accept_rate"] == params.predict.accept_rate
    meta["graft.unknown"].value = _json.dumps({**unknown, "threshold": 1e9})
    strict = tmp_path / "strict.onnx"
    onnx.save(proto, str(strict))
    out = tmp_path / "p.csv"
    assert main(["predict", str(folder), "--model", str(strict), "--out", str(out)]) == 0
    rows = pd.read_csv(out, keep_default_na=False)
    good = rows[rows["error"] == ""]
    assert len(good) and (good["predicted"] == "unknown").all() and set(good["best_guess"]) <= set(CLASSES)
    assert (good["in_distribution"].astype(float) < 1e9).all()
