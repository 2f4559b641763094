"""train.mode auto: each candidate wins where it should, the refit uses every non-test image, budgets are kept.

The selection tests build a feature table by hand, with the tiny backbone's column layout (raw pixels,
stage features, last-layer features), where only some blocks of columns carry the class: the candidate
that reads exactly those columns (and is the cheapest such) must win.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from graft.atomic import write_json, write_parquet
from graft.auto import finetune_size, fit_features
from graft.backbones import describe_backbone, fingerprint_of
from graft.cache import tap_columns
from graft.cacheparts import feature_table
from graft.model import head_from_payload, load_model
from graft.select import to_torch_head
from graft.tasks.auto import auto
from tests.helpers import make_params, write_tree

CLASSES = ["a", "b", "c"]
TAPS = ("raw", "stages", "last")
FEATURE_ONLY = ["pixels", "logreg", "mlp", "multilayer", "fusion"]


def _workspace(root: Path, signal: dict[str, float], per_class: int = 40, seed: int = 0) -> tuple:
    """manifest, classes and a features.parquet whose ``signal`` taps separate the classes (others are noise)."""
    desc = describe_backbone("tiny_cnn", None, None, TAPS, 4)
    meta = {
        "graft.backbone": "tiny_cnn",
        "graft.fingerprint": fingerprint_of(desc),
        "graft.description": json.dumps(desc, sort_keys=True),
    }
    rng = np.random.default_rng(seed)
    n = per_class * len(CLASSES)
    y = np.repeat(np.arange(len(CLASSES)), per_class)
    x = rng.normal(size=(n, desc["feature_dim"])).astype(np.float32)
    for tap, strength in signal.items():
        cols = tap_columns(meta, (tap,))
        centres = rng.normal(size=(len(CLASSES), len(cols))) * strength
        x[:, cols] += centres[y]
    shas = [f"{i:064x}" for i in range(n)]
    split = np.array(["train", "train", "train", "train", "val", "test"] * (n // 6 + 1))[rng.permutation(n)]
    manifest = pd.DataFrame(
        {
            "path": [f"{CLASSES[c]}/{i}.png" for i, c in enumerate(y)],
            "sha256": shas,
            "label": [CLASSES[c] for c in y],
            "split": split,
            "width": 32,
            "height": 32,
        }
    )
    (root / "data").mkdir(parents=True)
    write_parquet(root / "data/manifest.parquet", manifest)
    write_json(root / "data/classes.json", {"classes": CLASSES})
    table = feature_table(shas, x, desc["feature_dim"])
    write_parquet(
        root / "data/features.parquet", table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    )
    return manifest, x, meta


def _params(root: Path, **train):
    return make_params(
        root,
        {
            "featurize": {"taps": list(TAPS), "raw_size": 4},
            "train": {"mode": "auto", "candidates": FEATURE_ONLY, **train},
        },
    )


@pytest.mark.parametrize(
    ("signal", "winner"),
    [
        ({"raw": 1.0}, "pixels"),  # ImageNet features are noise: the raw-pixel model must win (and be shipped)
        ({"last": 1.0}, "logreg"),  # the usual probe
        ({"stages": 1.0}, "multilayer"),  # only the intermediate stages know the class
    ],
)
def test_the_candidate_reading_the_signal_wins(tmp_path: Path, signal: dict, winner: str) -> None:
    _workspace(tmp_path, signal)
    summary = auto(_params(tmp_path))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv")
    assert summary["chosen"] == winner, board[["candidate", "score", "se"]]
    assert board.loc[board["chosen"], "candidate"].tolist() == [winner]
    assert load_model(tmp_path / "models/model.pt")["candidate"] == winner


def test_fusion_wins_when_pixels_and_stages_know_different_classes(tmp_path: Path) -> None:
    """Pixels separate a from the rest, the stages b from c: only the model that reads both gets all three."""
    manifest, x, meta = _workspace(tmp_path, {})
    y = manifest["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    rng = np.random.default_rng(1)
    raw, stages = tap_columns(meta, ("raw",)), tap_columns(meta, ("stages",))
    x[:, raw[:4]] += 3.0 * (y == 0)[:, None]
    x[:, stages[:4]] += 3.0 * (y == 1)[:, None] - 3.0 * (y == 2)[:, None] + rng.normal(size=(len(y), 1)) * 0.1
    table = feature_table(manifest["sha256"].tolist(), x, x.shape[1])
    write_parquet(
        tmp_path / "data/features.parquet",
        table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()}),
    )
    assert auto(_params(tmp_path))["chosen"] == "fusion"


@pytest.mark.parametrize(("refit", "fit"), [("none", "train"), ("trainval", "train+val")])
def test_refit_uses_every_non_test_image(tmp_path: Path, refit: str, fit: str) -> None:
    manifest, x, meta = _workspace(tmp_path, {"last": 1.0})
    auto(_params(tmp_path, refit=refit, candidates=["logreg"]))
    payload = load_model(tmp_path / "models/model.pt")
    assert payload["fit"] == fit and "final" not in payload
    rows = manifest["split"].isin(fit.split("+")).to_numpy()
    y = manifest["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    cols = tap_columns(meta, ("last",))
    want = to_torch_head(fit_features("linear", x[rows][:, cols], y[rows], payload["settings"]), len(CLASSES))
    for k, v in want.items():
        torch.testing.assert_close(payload["state_dict"][k], v, rtol=1e-3, atol=1e-3)  # lbfgs stops within tol


@pytest.mark.parametrize(("candidate", "kind"), [("logreg", "linear"), ("mlp", "mlp")])
def test_class_weights_reach_the_candidates_and_their_refit(tmp_path: Path, candidate: str, kind: str) -> None:
    """``train.class_weights: true`` weighs auto's feature candidates as it weighs the head's loss, and the
    shipped refit is fitted with the same weights."""
    manifest, x, meta = _workspace(tmp_path, {"last": 1.0})
    params = _params(tmp_path, class_weights=True, candidates=[candidate])
    auto(params)
    payload = load_model(tmp_path / "models/model.pt")
    assert payload["settings"]["class_weight"] == "balanced"
    rows = np.r_[np.flatnonzero(manifest["split"] == "train"), np.flatnonzero(manifest["split"] == "val")]
    y = manifest["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    cols = tap_columns(meta, ("last",))  # the MLP's fit depends on the row order: train rows, then val rows
    pipe = fit_features(kind, x[rows][:, cols], y[rows], payload["settings"], params.seed)
    for k, v in to_torch_head(pipe, len(CLASSES)).items():
        torch.testing.assert_close(payload["state_dict"][k], v, rtol=1e-3, atol=1e-3)


def test_refit_all_adds_a_final_model_on_every_image(tmp_path: Path) -> None:
    _workspace(tmp_path, {"last": 1.0})
    auto(_params(tmp_path, refit="all", candidates=["logreg"]))
    payload = load_model(tmp_path / "models/model.pt")
    assert payload["fit"] == "train+val" and payload["final"]["fit"] == "train+val+test"
    a, b = head_from_payload(payload), head_from_payload(payload, final=True)
    assert not torch.equal(a.net[0].weight, b.net[0].weight)


def test_leaderboard_lists_every_candidate_with_scores_and_costs(tmp_path: Path) -> None:
    _workspace(tmp_path, {"last": 1.0})
    auto(_params(tmp_path))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv")
    assert sorted(board["candidate"]) == sorted(FEATURE_ONLY)
    assert board["score"].between(0, 1).all() and (board["se"] >= 0).all()
    assert (board["onnx_bytes"] > 0).all()
    timings = pd.read_csv(tmp_path / "metrics/leaderboard_timings.csv")  # wall-clock figures: not a DVC output
    assert list(timings["candidate"]) == list(board["candidate"])
    assert (timings["latency_ms_batch_1"] > 0).all() and (timings["train_seconds"] >= 0).all()
    assert "latency_ms_batch_1" not in board and "train_seconds" not in board
    assert board["scored_on"].str.contains("fold CV on train\\+val").all()  # 120 images: small, so k-fold
    folds = board["scored_on"].str.extract(r"^(\d+)-fold")[0].astype(int)
    # the fold-to-fold spread the issue asks for, beside the SE of the mean the one-SE rule uses (SE = std / sqrt k)
    np.testing.assert_allclose(board["cv_std"], board["se"] * np.sqrt(folds), atol=2e-4)
    assert (board["cv_std"] > 0).any()
    pixels, fusion = board.set_index("candidate").loc[["pixels", "fusion"], "onnx_bytes"]
    assert pixels < fusion  # the raw-pixel graph runs no network


def test_large_sets_are_scored_on_the_val_split(tmp_path: Path) -> None:
    _workspace(tmp_path, {"last": 1.0})
    auto(_params(tmp_path, cv_below=10, candidates=["logreg"]))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv")
    n_val = int((pd.read_parquet(tmp_path / "data/manifest.parquet")["split"] == "val").sum())
    assert board.loc[0, "scored_on"] == f"val split (n={n_val})"
    assert pd.isna(board.loc[0, "cv_std"])  # one val score: no folds to spread over (its SE is a bootstrap)


@pytest.mark.parametrize(("sides", "size"), [([8, 8, 8], 96), ([28, 30], 96), ([100, 120], 128), ([375, 500], 224)])
def test_finetune_size_follows_the_data(sides: list[int], size: int) -> None:
    assert finetune_size(np.array(sides), 224) == size


def test_finetune_candidate_lp_ft_on_images(tmp_path: Path, one_torch_thread) -> None:
    """LP-FT runs on real images, is scored on val, and shows its size and epochs in the leaderboard."""
    from graft.stages import run_stage

    write_tree(tmp_path / "raw", classes=("cat", "dog", "bird"), per_class=14)
    params = make_params(
        tmp_path,
        {
            "featurize": {"taps": list(TAPS), "raw_size": 4},
            "train": {"mode": "auto", "candidates": ["logreg", "finetune"], "finetune": {"epochs": 2, "batch_size": 8}},
        },
    )
    for stage in ("ingest", "featurize", "train"):
        run_stage(stage, params)
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    settings = json.loads(board.loc["finetune", "settings"])
    assert settings["image_size"] == 32 and 1 <= settings["best_epoch"] <= 2 and settings["init"] == "probe"
    assert board.loc["finetune", "scored_on"].startswith("val split")


def test_a_candidate_that_cannot_fit_the_budget_is_skipped_and_said(tmp_path: Path, one_torch_thread) -> None:
    from graft.stages import run_stage

    write_tree(tmp_path / "raw", classes=("cat", "dog"), per_class=10)
    params = make_params(
        tmp_path,
        {
            "featurize": {"taps": list(TAPS), "raw_size": 4},
            "train": {"mode": "auto", "candidates": ["logreg", "finetune"], "budget_minutes": 1e-4},
        },
    )
    for stage in ("ingest", "featurize", "train"):
        run_stage(stage, params)
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    assert board.loc["finetune", "note"].startswith("skipped:")
    assert json.loads((tmp_path / "metrics/train.json").read_text())["chosen"] == "logreg"


def test_auto_needs_the_taps_it_reads(tmp_path: Path) -> None:
    """A feature table without raw pixels: the pixel candidate is skipped with the reason, the rest run."""
    _workspace(tmp_path, {"last": 1.0})
    table = pa.parquet.read_table(tmp_path / "data/features.parquet")
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    desc = json.loads(meta["graft.description"])
    cols = tap_columns(meta, ("last",))
    x = table["feature"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)[:, cols]
    plain = describe_backbone("tiny_cnn")
    new_meta = {
        "graft.backbone": "tiny_cnn",
        "graft.fingerprint": fingerprint_of(plain),
        "graft.description": json.dumps(plain, sort_keys=True),
    }
    write_parquet(
        tmp_path / "data/features.parquet",
        feature_table(table["sha256"].to_pylist(), x, plain["feature_dim"]).replace_schema_metadata(
            {k.encode(): v.encode() for k, v in new_meta.items()}
        ),
    )
    assert desc["taps"] == list(TAPS)
    auto(_params(tmp_path, candidates=["pixels", "logreg"]))
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    assert "featurize" in board.loc["pixels", "note"] and board.loc["logreg", "chosen"]


def test_another_local_backbone_competes_and_ships_when_it_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread
) -> None:
    """other_backbones: a backbone whose weights are here (a resnet18 checkpoint in the torch hub folder) gets a
    probe on its own features, in its own cache folder; as the only candidate it wins, and the model, the
    evaluation and the ONNX export all run on that backbone, not on featurize.backbone."""
    import onnx
    import torchvision

    import graft.tasks.auto as auto_stage
    from graft.stages import run_stage

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), hub / "checkpoints/resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(auto_stage, "local_backbones", lambda: ["tiny_cnn", "resnet18"])  # tiny_cnn: featurize's own
    write_tree(tmp_path / "raw", classes=("cat", "dog"), per_class=10)
    params = make_params(
        tmp_path,
        {"featurize": {"image_size": 32}, "train": {"mode": "auto", "candidates": ["other_backbones"]}},
    )
    for stage in ("ingest", "featurize", "train", "evaluate", "export"):
        run_stage(stage, params)
    board = pd.read_csv(tmp_path / "metrics/leaderboard.csv").set_index("candidate")
    assert board.index.tolist() == ["resnet18 logreg"] and board.loc["resnet18 logreg", "chosen"]
    payload = load_model(tmp_path / "models/model.pt")
    assert payload["candidate"] == "resnet18 logreg" and payload["backbone"]["name"] == "resnet18"
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("[!.]*")) == ["resnet18", "tiny_cnn"]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "models/model.onnx")).metadata_props}
    assert meta["graft.backbone"] == "resnet18" and meta["graft.model"] == "resnet18 + logreg head", meta
    assert json.loads(meta["graft.input"])["crop"] == 224  # resnet18's own input, not featurize.image_size (32)
    assert json.loads((tmp_path / "metrics/evaluation.json").read_text())["model"]["n"] > 0
