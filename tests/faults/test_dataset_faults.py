"""Fault rows 8-11 and 22: the shape of the dataset (classes, duplicates, leakage, tiny data)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from graft import GraftError
from graft.cache import load_feature_table
from graft.leakage import leakage_report
from graft.params import SplitParams
from graft.tasks.evaluate import evaluate
from graft.tasks.featurize import featurize
from graft.tasks.finetune import finetune
from graft.tasks.ingest import hash_split, ingest
from graft.tasks.train_head import train
from tests.faults.helpers import encode, params_for, png_bytes, reasons, run_ingest
from tests.helpers import class_image, write_tree


def _empty_class(raw: Path) -> None:
    write_tree(raw, per_class=4)
    (raw / "bird of prey").mkdir()
    (raw / "bird of prey/notes.txt").write_text("todo", encoding="utf-8")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            _empty_class,
            r"class folder 'bird of prey' has no images: add images or remove the folder",
            id="empty-class-folder",
        ),
        pytest.param(
            lambda raw: write_tree(raw, classes=("cat",), per_class=6),
            r"need at least 2 classes with usable images, found 1: only 'cat'",
            id="one-class",
        ),
        pytest.param(lambda raw: None, r"no usable images found under .*raw", id="no-images"),
        pytest.param(
            lambda raw: (raw / "cat").mkdir() or (raw / "cat/a.txt").write_text("x"),
            r"class folder 'cat' has no images",
            id="only-non-images",
        ),
    ],
)
def test_empty_class_one_class_or_no_images_is_a_clear_error(ws: Path, make, message: str) -> None:
    """Each malformed tree stops ingest with a one-line message saying what is wrong; no manifest is written."""
    make(ws / "raw")

    with pytest.raises(GraftError, match=message) as info:
        ingest(params_for(ws))

    assert len(str(info.value).splitlines()) == 1
    assert not (ws / "data/manifest.parquet").exists()


@pytest.fixture
def trained(ws: Path):
    """cat/dog ingested, featurized and trained (head) in ``ws``."""
    write_tree(ws / "raw", per_class=12)
    params = params_for(ws, {"train": {"max_epochs": 30}})
    ingest(params)
    featurize(params)
    train(params)
    return ws, params


def test_unseen_class_is_a_clear_error_against_the_class_map(trained) -> None:
    """New data with a class the model never saw: evaluate names the new class and the two ways forward."""
    ws, params = trained
    write_tree(ws / "raw", classes=("cat", "dog", "bird"), per_class=12)
    ingest(params)
    featurize(params)

    with pytest.raises(
        GraftError,
        match=r"model classes differ from data/classes.json \(new in the data: \['bird'\]; "
        r"only in the model: none\): rerun train, or fine-tune .* train\.init_from",
    ):
        evaluate(params)


def test_renamed_class_is_a_clear_error_against_the_class_map(trained) -> None:
    """A class folder renamed after training (dog -> hound) is named on both sides."""
    ws, params = trained
    (ws / "raw/dog").rename(ws / "raw/hound")
    ingest(params)
    featurize(params)

    with pytest.raises(GraftError, match=r"new in the data: \['hound'\]; only in the model: \['dog'\]"):
        evaluate(params)


def test_init_from_is_the_explicit_option_for_new_classes(trained) -> None:
    """Fine-tuning from the old model with train.init_from rebuilds the head for the new class map."""
    ws, params = trained
    shutil.copytree(ws / "models", ws / "old-models")
    write_tree(ws / "raw", classes=("cat", "dog", "bird"), per_class=12)
    ft = params_for(
        ws,
        {
            "train": {
                "mode": "finetune",
                "init_from": str(ws / "old-models"),
                "finetune": {"epochs": 1, "strategy": "head", "batch_size": 16},
            }
        },
    )
    ingest(ft)

    summary = finetune(ft)

    assert summary["head"].startswith("rebuilt for 3 classes (source had 2)")
    assert json.loads((ws / "data/classes.json").read_text())["classes"] == ["bird", "cat", "dog"]


def test_same_image_under_two_labels_is_quarantined_and_reported(ws: Path) -> None:
    """By default both copies are quarantined (so neither is in train or test) and leakage.csv names the pair."""
    write_tree(ws / "raw", per_class=12)
    shutil.copyfile(ws / "raw/cat/cat-003.png", ws / "raw/dog/looks-like-a-dog.png")

    summary, m, q = run_ingest(ws)
    report = leakage_report(params_for(ws), m, q, None)

    assert set(reasons(q)) == {"cat/cat-003.png", "dog/looks-like-a-dog.png"}
    assert not {"cat/cat-003.png", "dog/looks-like-a-dog.png"} & set(m["path"])
    assert summary["label_conflicts"] == 1
    leak = pd.read_csv(ws / "data/leakage.csv", keep_default_na=False)
    assert report["exact_duplicates_across_labels"] == 1
    assert leak[["kind", "path_a", "label_a", "split_a", "path_b", "label_b", "split_b"]].values.tolist() == [
        ["exact_cross_label", "cat/cat-003.png", "cat", "quarantined", "dog/looks-like-a-dog.png", "dog", "quarantined"]
    ]


def test_keep_puts_both_labels_in_one_split_and_reports_them(ws: Path) -> None:
    """With ingest.label_conflicts: keep, both rows stay, always in the same split, and the pair is reported."""
    write_tree(ws / "raw", per_class=12)
    shutil.copyfile(ws / "raw/cat/cat-003.png", ws / "raw/dog/looks-like-a-dog.png")

    _, m, q = run_ingest(ws, {"ingest": {"label_conflicts": "keep"}})
    leakage_report(params_for(ws), m, q, None)

    both = m[m["path"].isin(["cat/cat-003.png", "dog/looks-like-a-dog.png"])]
    assert sorted(both["label"]) == ["cat", "dog"] and both["split"].nunique() == 1
    leak = pd.read_csv(ws / "data/leakage.csv", keep_default_na=False)
    assert leak["kind"].tolist() == ["exact_cross_label"]
    assert leak.loc[0, "split_a"] == leak.loc[0, "split_b"] == both["split"].iloc[0]


def test_exact_duplicate_across_split_folders_is_kept_in_one_split(ws: Path) -> None:
    """The same bytes in train/ and test/ both end up in train, and the move is counted."""
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for ci, c in enumerate(("cat", "dog")):
            (ws / "raw" / split / c).mkdir(parents=True)
            for i in range(n):
                class_image(ci, 100 * len(split) + i).save(ws / "raw" / split / c / f"{i}.png")
    shutil.copyfile(ws / "raw/train/cat/0.png", ws / "raw/test/cat/leaked.png")

    summary, m, _ = run_ingest(ws)

    by_path = m.set_index("path")["split"]
    assert by_path["test/cat/leaked.png"] == by_path["train/cat/0.png"] == "train"
    assert summary["duplicates_moved_to_one_split"] == 1


def _copy_in_another_split(original: bytes) -> bytes:
    """A copy of a PNG with one pixel nudged, chosen so its content hash lands in another split."""
    img = Image.open(io.BytesIO(original)).convert("RGB")
    split = hash_split(hashlib.sha256(original).hexdigest(), SplitParams())
    for k in range(1, 200):
        arr = np.asarray(img).copy()
        arr[0, 0] = (arr[0, 0].astype(int) + k) % 256
        data = encode(Image.fromarray(arr), "PNG")
        if hash_split(hashlib.sha256(data).hexdigest(), SplitParams()) != split:
            return data
    raise AssertionError("no variant landed in another split")


def test_near_duplicate_across_splits_is_reported(ws: Path) -> None:
    """A one-pixel edit of an image, hashed into another split, is listed in leakage.csv with its similarity."""
    write_tree(ws / "raw", per_class=12)
    original = (ws / "raw/cat/cat-005.png").read_bytes()
    (ws / "raw/cat/cat-005-edited.png").write_bytes(_copy_in_another_split(original))
    _, m, q = run_ingest(ws)
    params = params_for(ws, {"evaluate": {"near_duplicate_threshold": 0.999999}})
    featurize(params)
    feats, _ = load_feature_table(params.featurize.out)

    report = leakage_report(params, m, q, feats)

    leak = pd.read_csv(ws / "data/leakage.csv", keep_default_na=False)
    pair = leak[(leak[["path_a", "path_b"]].isin(["cat/cat-005.png", "cat/cat-005-edited.png"])).all(axis=1)]
    assert len(pair) == 1 and pair["kind"].item() == "near_duplicate"
    assert pair["split_a"].item() != pair["split_b"].item()
    assert pair["similarity"].item() >= 0.999999
    assert report["near_duplicates_across_splits"] == len(leak) >= 1
    assert (leak["split_a"] != leak["split_b"]).all()


def test_two_images_per_class_trains_and_reports_honestly(ws: Path) -> None:
    """2 images per class (one train, one test): the whole pipeline runs and the report says n = 2."""
    for split in ("train", "test"):
        for ci, c in enumerate(("cat", "dog")):
            (ws / "raw" / split / c).mkdir(parents=True)
            (ws / "raw" / split / c / "only.png").write_bytes(png_bytes(ci, len(split)))
    params = params_for(ws, {"train": {"max_epochs": 20}})

    summary = ingest(params)
    featurize(params)
    train(params)
    metrics = evaluate(params)

    assert (summary["train"], summary["val"], summary["test"]) == (2, 0, 2)
    assert metrics["model"]["n"] == metrics["baseline"]["n"] == 2
    report = Path(params.evaluate.report).read_text(encoding="utf-8")
    assert "Test split (2 images)" in report and "train: 2, val: 0, test: 2" in report


def _split_of(path: Path) -> str:
    return hash_split(hashlib.sha256(path.read_bytes()).hexdigest(), SplitParams())


def test_two_images_per_class_by_hash_split_runs_honestly(ws: Path) -> None:
    """With hash splits, 3 classes x 2 images give 3 train, 1 val, 2 test images: it runs and reports n = 2."""
    write_tree(ws / "raw", classes=("cat", "dog", "emu"), per_class=2)
    splits = sorted(_split_of(p) for p in (ws / "raw").rglob("*.png"))
    assert splits == ["test", "test", "train", "train", "train", "val"]  # what the content hashes decide
    params = params_for(ws, {"train": {"max_epochs": 20}})

    ingest(params)
    featurize(params)
    train(params)
    metrics = evaluate(params)

    assert metrics["model"]["n"] == 2 and metrics["counts"] == {"train": 3, "val": 1, "test": 2}


def test_class_whose_two_images_hash_out_of_train_is_a_clear_error(ws: Path) -> None:
    """If neither image of a class hashes into train, ingest says so instead of training without it."""
    write_tree(ws / "raw", classes=("cat", "dog"), per_class=4)
    (ws / "raw/emu").mkdir()
    picked = 0
    for i in range(200):  # two emu images whose hashes both fall outside train
        data = png_bytes(2, i)
        if hash_split(hashlib.sha256(data).hexdigest(), SplitParams()) != "train":
            (ws / f"raw/emu/{i}.png").write_bytes(data)
            picked += 1
            if picked == 2:
                break

    with pytest.raises(
        GraftError, match=r"^class 'emu' has no image in the train split: add images or adjust data.split$"
    ):
        ingest(params_for(ws))
