"""`graft predict` keeps its word: --top-k, --out formats by extension, quiet with --out, rounded screen
output, columns named for what they are, a non-zero exit when nothing was predicted; the model's metadata
and the arguments are validated before any image is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graft.cli import main
from graft.predict import read_metadata
from tests.helpers import class_image

CLASSES = ["red", "green", "blue"]
SPEC = {"crop": 32, "resize": 36, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}


def tiny_model(path: Path, classes: list[str] = CLASSES, spec: dict | None = None, outputs: int | None = None) -> Path:
    """A graft-style ONNX model (mean-pool pixels, a fixed linear layer, softmax) with the given metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = outputs or len(classes)
    w = (np.eye(3, n, dtype=np.float32) * 6.0) - 2.0
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    meta = {"graft.classes": json.dumps(classes), "graft.input": json.dumps(spec or SPEC)}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six images (two per colour) and one unreadable file."""
    d = tmp_path / "incoming"
    d.mkdir()
    for i in range(6):
        class_image(i % 3, 900 + i).save(d / f"img{i}.png")
    (d / "zz-broken.png").write_bytes(b"not an image")
    return d


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model.onnx")


def test_top_k_on_screen_rounded(folder: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(folder), "--model", str(model), "--top-k", "3"]) == 0
    lines = [ln.split("\t") for ln in capsys.readouterr().out.splitlines()]
    good = [ln for ln in lines if ln[1] != "ERROR"]
    assert len(good) == 6 and all(len(ln) == 1 + 2 * 3 for ln in good)  # path + 3 x (label, confidence)
    for ln in good:
        assert sorted(ln[1::2]) == sorted(CLASSES)  # the three most likely of three classes: each once
        confs = [float(c) for c in ln[2::2]]
        assert confs == sorted(confs, reverse=True)
        assert all(len(c.split(".")[1]) == 3 for c in ln[2::2])  # rounded for the screen


@pytest.mark.parametrize("ext", ["csv", "parquet", "jsonl"])
def test_out_format_follows_the_extension(
    folder: Path, model: Path, tmp_path: Path, ext: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / f"preds.{ext}"
    assert main(["predict", str(folder), "--model", str(model), "--top-k", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # quiet with --out
    assert captured.err.strip() == f"6 predicted, 1 unreadable, written to {out}"
    read = {"csv": pd.read_csv, "parquet": pd.read_parquet, "jsonl": lambda p: pd.read_json(p, lines=True)}[ext]
    if ext == "parquet":
        assert out.read_bytes()[:4] == b"PAR1"
    rows = read(out)
    cols = [
        "path",
        "predicted",
        "confidence",
        "best_guess",
        "top2_label",
        "top2_confidence",
        "in_distribution",
        "error",
    ]
    assert list(rows.columns) == cols and len(rows) == 7
    ok = rows[rows["error"].isna()]
    assert len(ok) == 6 and set(ok["best_guess"]) <= set(CLASSES) and set(ok["predicted"]) <= {*CLASSES, "unknown"}
    assert ok["in_distribution"].isna().all()  # this hand-made graph has no in-distribution output
    assert (ok["confidence"] >= ok["top2_confidence"]).all() and (ok["best_guess"] != ok["top2_label"]).all()
    bad = rows[rows["error"].notna()]
    assert list(bad["path"].map(lambda p: Path(p).name)) == ["zz-broken.png"] and bad["predicted"].isna().all()


def test_print_with_out_shows_the_rows_too(folder: Path, model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", str(folder), "--model", str(model), "--out", str(out), "--print"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 7 and out.is_file()


def test_unknown_extension_is_refused_before_anything_runs(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "preds.txt"
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(folder), "--model", str(tmp_path / "absent.onnx"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ".csv, .parquet, .jsonl" in err and "Traceback" not in err and not out.exists()


def test_nothing_predicted_exits_non_zero(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "all-bad"
    d.mkdir()
    for i in range(3):
        (d / f"b{i}.jpg").write_bytes(b"junk")
    assert main(["predict", str(d), "--model", str(model)]) == 1
    assert capsys.readouterr().err.strip().endswith("0 predicted, 3 unreadable")


def test_empty_folder_says_so(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", str(model)]) == 2
    assert "no image files under" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["--top-k", "0"], ["--batch-size", "0"], ["--batch-size", "-1"], ["--threads", "-2"], ["--top-k", "x"]]
)
def test_arguments_are_validated_by_the_parser(folder: Path, model: Path, args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(folder), "--model", str(model), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert args[0] in err and "Traceback" not in err


def test_top_k_above_the_class_count_shows_every_class(folder: Path, model: Path, capsys) -> None:
    assert main(["predict", str(folder / "img0.png"), "--model", str(model), "--top-k", "10"]) == 0
    assert len(capsys.readouterr().out.strip().split("\t")) == 1 + 2 * len(CLASSES)


@pytest.mark.parametrize(
    ("classes", "spec", "outputs", "says"),
    [
        (CLASSES, {**SPEC, "resize": 100_000}, None, "resize 100000 is above"),
        ([f"c{i}" for i in range(50)], SPEC, 3, "names 50 classes but the graph outputs 3"),
        (CLASSES, {**SPEC, "crop": -4}, None, "crop"),
        (CLASSES, {**SPEC, "interpolation": "magic"}, None, "interpolation"),
        (CLASSES, {k: v for k, v in SPEC.items() if k != "mean"}, None, "missing key 'mean'"),
        (CLASSES, {**SPEC, "crop": 24, "resize": 24}, None, "differs from the graph's input side 32"),
        (["red", "red", "blue"], SPEC, None, "distinct"),
    ],
)
def test_forged_metadata_is_refused_before_any_image(
    folder: Path, tmp_path: Path, classes, spec, outputs, says, capsys
) -> None:
    bad = tiny_model(tmp_path / "forged.onnx", classes, spec, outputs)
    assert main(["predict", str(folder), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graft: error:") and says in err[0] and str(bad) in err[0]


def test_malformed_metadata_json_is_one_line() -> None:
    from graft import GraftError

    with pytest.raises(GraftError, match="not valid JSON"):
        read_metadata({"graft.classes": "[oops", "graft.input": "{}"}, "m.onnx")
    with pytest.raises(GraftError, match="graft.input must be a JSON object"):
        read_metadata({"graft.classes": '["a", "b"]', "graft.input": "[1]"}, "m.onnx")
    classes, pp = read_metadata({"graft.classes": '["a", "b"]', "graft.input": json.dumps(SPEC)}, "m.onnx", 2, 32)
    assert classes == ["a", "b"] and pp.crop == 32


def test_a_label_with_a_newline_stays_on_one_screen_line(folder: Path, tmp_path: Path, capsys) -> None:
    model = tiny_model(tmp_path / "nl.onnx", ["red\nline", "green", "blue"])
    assert main(["predict", str(folder / "img0.png"), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "red\\nline" in out
