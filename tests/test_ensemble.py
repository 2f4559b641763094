"""auto's ``ensemble`` candidate: it wins where its members err independently, it is never picked from fewer than
two members, its model file is the mean of its refit members, and it exports to ONNX like any head.

The selection cases reuse :mod:`tests.test_auto`'s hand-built feature tables (the tiny backbone's column layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from graft import GraftError
from graft.auto import fit_features
from graft.backbones import build_backbone
from graft.cache import tap_columns
from graft.ensemble_head import EnsembleHead
from graft.model import Classifier, Head, Serving, head_from_payload, load_model, model_name, save_model
from graft.onnxexport import check_against_torch, export_onnx
from graft.tasks.auto import auto
from tests.test_auto import CLASSES, _params, _workspace


def _labels(manifest: pd.DataFrame) -> np.ndarray:
    return manifest["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()


def test_the_ensemble_wins_where_its_members_err_independently(tmp_path: Path) -> None:
    """Raw pixels and last-layer features each carry the class under their own noise: either alone is often
    wrong, the mean of the two models' probabilities is wrong less often, by more than the one-SE rule asks."""
    _workspace(tmp_path, {"raw": 0.45, "last": 0.25}, per_class=60)
    summary = auto(_params(tmp_path, candidates=["pixels", "logreg", "ensemble"]))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    assert summary["chosen"] == "ensemble", board[["score", "se"]]
    assert board.loc["ensemble", "score"] > board.loc[["pixels", "logreg"], "score"].max() + board.loc["ensemble", "se"]
    assert board.loc["ensemble", "onnx_bytes"] > 0 and board.loc["ensemble", "settings"] == (
        '{"members": ["pixels", "logreg"]}'
    )


def test_the_model_file_is_the_mean_of_the_members_refit_on_train_and_val(tmp_path: Path) -> None:
    manifest, x, meta = _workspace(tmp_path, {"raw": 0.45, "last": 0.25}, per_class=60)
    params = _params(tmp_path, candidates=["pixels", "logreg", "ensemble"])
    auto(params)
    payload = load_model(tmp_path / "models/model.pt")
    assert payload["candidate"] == "ensemble" and payload["fit"] == "train+val"
    assert payload["backbone"]["taps"] == ["raw", "last"]
    assert model_name(payload) == "tiny_cnn features: mean of 2 heads (pixels, logreg)"
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    y, fit = _labels(manifest), manifest["split"].isin(["train", "val"]).to_numpy()
    rows = np.r_[np.flatnonzero(manifest["split"] == "train"), np.flatnonzero(manifest["split"] == "val")]
    test = manifest["split"].eq("test").to_numpy()
    assert fit.sum() == len(rows)
    probs = []
    for name, tap in (("pixels", "raw"), ("logreg", "last")):
        cols = tap_columns(meta, (tap,))
        settings = json.loads(board.loc[name, "settings"])
        pipe = fit_features("linear", x[rows][:, cols], y[rows], settings)
        probs.append(pipe.predict_proba(x[test][:, cols]))
    union = tap_columns(meta, ("raw", "last"))
    with torch.no_grad():
        got = head_from_payload(payload)(torch.from_numpy(x[test][:, union])).numpy()
    np.testing.assert_allclose(np.exp(got), np.mean(probs, axis=0), atol=2e-3)  # lbfgs stops within its tolerance


def test_no_ensemble_of_fewer_than_two_members(tmp_path: Path) -> None:
    _workspace(tmp_path, {"last": 1.0})
    summary = auto(_params(tmp_path, candidates=["logreg", "ensemble"]))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    assert summary["chosen"] == "logreg"
    assert board.loc["ensemble", "note"].startswith("skipped: it averages two or more feature candidates")


def test_an_ensemble_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    bb = build_backbone("tiny_cnn", None, 32, ("raw", "last"), 4)
    raw, last = np.arange(16), np.arange(16, bb.feature_dim)
    torch.manual_seed(0)
    members = [Head(len(raw), 3, "logreg"), Head(len(last), 3, "mlp", hidden=8)]
    head = EnsembleHead(members, [len(raw), len(last)], 3)
    head.load_state_dict({**head.state_dict(), "columns_0": torch.from_numpy(raw), "columns_1": torch.from_numpy(last)})
    model = Classifier(bb.model, head).eval()
    images = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        feats = bb.model(torch.from_numpy(images))
        member_probs = [torch.softmax(m(feats[:, c]), 1).numpy() for m, c in zip(members, (raw, last), strict=True)]
        want = np.mean(member_probs, axis=0)
        np.testing.assert_allclose(model(torch.from_numpy(images)).numpy(), want, atol=1e-6)
    path = tmp_path / "model.onnx"
    export_onnx(Serving(model).eval(), path, 32, 17, {})
    report = check_against_torch(path, Serving(model).eval(), images, atol=1e-5)
    assert max(report.values()) <= 1e-5


def test_a_model_file_whose_ensemble_lists_no_member_heads_is_refused(tmp_path: Path) -> None:
    head = {"kind": "ensemble", "dim": 4, "hidden": 0, "dropout": 0.0, "members": [{"kind": "logreg"}]}
    payload = {"kind": "head", "classes": ["a", "b"], "backbone": {"name": "tiny_cnn"}, "head": head}
    save_model(tmp_path / "model.pt", {**payload, "state_dict": {}})
    with pytest.raises(GraftError, match="ensemble must list its members' heads"):
        load_model(tmp_path / "model.pt")
