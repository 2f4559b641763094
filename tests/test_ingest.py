"""tasks.ingest: every file decoded and hashed, the bad quarantined with a reason, splits by content hash."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from graft import GraftError
from graft.dataset import MANIFEST_COLUMNS, SPLITS
from graft.params import SplitParams
from graft.tasks.ingest import hash_split, ingest
from tests.helpers import class_image, make_params, write_tree


def run(ws: Path, overrides: dict | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Ingest ``ws/raw``; return the summary, the manifest and the quarantine table."""
    summary = ingest(make_params(ws, overrides))
    return summary, read_manifest(ws), read_quarantine(ws)


def read_manifest(ws: Path) -> pd.DataFrame:
    return pd.read_parquet(ws / "data" / "manifest.parquet")


def read_quarantine(ws: Path) -> pd.DataFrame:
    return pd.read_csv(ws / "data" / "quarantine.csv", dtype=str, keep_default_na=False)


def read_classes(ws: Path) -> list[str]:
    return json.loads((ws / "data" / "classes.json").read_text(encoding="utf-8"))["classes"]


def reasons(q: pd.DataFrame) -> dict[str, str]:
    return dict(zip(q["path"], q["reason"], strict=True))


def png_bytes(label_index: int, i: int) -> bytes:
    buf = io.BytesIO()
    class_image(label_index, i).save(buf, format="PNG")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    """A noise JPEG cut in half: Image.open succeeds, the full decode fails."""
    arr = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def rotated_jpeg(orientation: int = 6) -> bytes:
    """A 60x40 stored JPEG whose EXIF orientation turns it upright to 40x60."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    class_image(0, 99, size=(60, 40)).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


# --- class folders: the happy path ----------------------------------------------------------------


def test_class_folders_give_one_row_per_image_with_exact_columns(ws: Path) -> None:
    """Each image becomes one row of path, sha256, label, split, width, height; nothing is quarantined."""
    paths = write_tree(ws / "raw", classes=("zebra", "apple", "mango"), per_class=8)

    summary, m, q = run(ws)

    assert list(m.columns) == MANIFEST_COLUMNS == ["path", "sha256", "label", "split", "width", "height"]
    assert len(m) == len(paths) == 24
    expected = {p.relative_to(ws / "raw").as_posix(): p for p in paths}
    assert sorted(m["path"]) == sorted(expected) == list(m["path"])  # sorted by path
    for row in m.itertuples():
        src = expected[row.path]
        assert row.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        assert row.label == src.parent.name
        assert (row.width, row.height) == (40, 32)
    assert set(m["split"]) <= set(SPLITS)
    assert list(q.columns) == ["path", "reason"] and len(q) == 0


def test_class_map_is_sorted(ws: Path) -> None:
    """classes.json lists the labels sorted by name (not by size), so the class index is stable."""
    for ci, (c, n) in enumerate((("apple", 6), ("Mango", 8), ("zebra", 10))):
        (ws / "raw" / c).mkdir()
        for i in range(n):
            class_image(ci, i).save(ws / "raw" / c / f"{i}.png")

    run(ws)

    assert read_classes(ws) == ["Mango", "apple", "zebra"]


def test_summary_counts_match_the_outputs(ws: Path) -> None:
    """The returned summary agrees with the manifest."""
    write_tree(ws / "raw", classes=("cat", "dog"), per_class=15)

    summary, m, _ = run(ws)

    assert summary["images"] == 30 and summary["classes"] == 2
    for s in SPLITS:
        assert summary[s] == int((m["split"] == s).sum())
    assert summary["train"] + summary["val"] + summary["test"] == 30
    assert summary["train"] > 0
    assert summary["quarantined"] == summary["ignored_non_images"] == summary["duplicate_images"] == 0
    assert summary["duplicates_moved_to_one_split"] == summary["label_conflicts"] == 0


# --- bad and odd files ------------------------------------------------------------------------------


def test_bad_files_are_quarantined_with_a_reason_and_good_ones_kept(ws: Path) -> None:
    """Truncated, zero-byte and text-as-.jpg files are quarantined; the 24 good images stay."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/truncated.jpg").write_bytes(truncated_jpeg())
    (ws / "raw/cat/empty.jpg").write_bytes(b"")
    (ws / "raw/dog/letter.jpg").write_text("Dear diary, this is not a JPEG.\n", encoding="utf-8")

    summary, m, q = run(ws)

    r = reasons(q)
    assert set(r) == {"cat/truncated.jpg", "cat/empty.jpg", "dog/letter.jpg"}
    assert r["cat/truncated.jpg"].startswith("cannot decode")
    assert r["cat/empty.jpg"] == "empty file (0 bytes)"
    assert r["dog/letter.jpg"] == "not a recognised image format"
    assert len(m) == 24 and not set(r) & set(m["path"])
    assert summary["quarantined"] == 3


def test_loose_file_at_the_root_is_quarantined(ws: Path) -> None:
    """An image outside any class folder has no label: it is quarantined, not guessed."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/stray.png").write_bytes(png_bytes(0, 50))

    _, m, q = run(ws)

    assert reasons(q) == {"stray.png": "not inside a class folder"}
    assert "stray.png" not in set(m["path"])


def test_hidden_files_and_folders_are_ignored(ws: Path) -> None:
    """Dot-files, dot-folders inside a class and a dot-folder at the root are neither rows nor classes."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/.hidden.png").write_bytes(png_bytes(0, 60))
    (ws / "raw/cat/.DS_Store").write_bytes(b"\0\0\0\1Bud1 junk")
    (ws / "raw/dog/.thumbs").mkdir()
    (ws / "raw/dog/.thumbs/t.png").write_bytes(png_bytes(1, 61))
    (ws / "raw/.git").mkdir()
    (ws / "raw/.git/logo.png").write_bytes(png_bytes(2, 62))
    (ws / "raw/.keep.png").write_bytes(png_bytes(2, 63))

    summary, m, q = run(ws)

    assert len(m) == 24 and not any("/." in "/" + p for p in m["path"])
    assert len(q) == 0
    assert read_classes(ws) == ["cat", "dog"]
    assert summary["ignored_non_images"] == 0


def test_non_image_extensions_are_ignored_and_counted(ws: Path) -> None:
    """notes.txt and labels.json in class folders are skipped and counted, not quarantined."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/notes.txt").write_text("shot in 2019", encoding="utf-8")
    (ws / "raw/dog/labels.json").write_text("{}", encoding="utf-8")
    (ws / "raw/dog/sub").mkdir()
    (ws / "raw/dog/sub/readme.md").write_text("#", encoding="utf-8")

    summary, m, q = run(ws)

    assert summary["ignored_non_images"] == 3
    assert len(m) == 24 and len(q) == 0


def test_images_in_nested_folders_take_the_class_folder_label(ws: Path) -> None:
    """<class>/<sub>/<image> is labelled with the class folder, not the sub-folder; rows are sorted by path."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/2019/summer").mkdir(parents=True)
    (ws / "raw/cat/2019/summer/beach.png").write_bytes(png_bytes(0, 70))

    _, m, _ = run(ws)

    row = m.set_index("path").loc["cat/2019/summer/beach.png"]
    assert row["label"] == "cat"
    assert read_classes(ws) == ["cat", "dog"]
    assert list(m["path"]) == sorted(m["path"])  # os.walk lists cat/*.png before cat/2019/...


@pytest.mark.timeout(30)
def test_symlink_loops_neither_hang_nor_crash(ws: Path) -> None:
    """Folder symlinks pointing at a parent (or itself) are not followed, so each image is listed once."""
    write_tree(ws / "raw", per_class=12)
    os.symlink("..", ws / "raw/cat/up")  # raw/cat/up -> raw
    os.symlink(".", ws / "raw/dog/self")  # raw/dog/self -> raw/dog
    os.symlink(ws / "raw", ws / "raw/root-again")  # a "class folder" that is a loop

    summary, m, q = run(ws)

    assert len(m) == 24 and m["path"].is_unique
    assert read_classes(ws) == ["cat", "dog"]
    assert len(q) == 0


def test_broken_symlink_image_is_quarantined(ws: Path) -> None:
    """x.jpg pointing nowhere is quarantined as unreadable."""
    write_tree(ws / "raw", per_class=12)
    os.symlink(ws / "nowhere/x.jpg", ws / "raw/cat/x.jpg")

    _, m, q = run(ws)

    r = reasons(q)
    assert list(r) == ["cat/x.jpg"]
    assert r["cat/x.jpg"].startswith("cannot read file")
    assert len(m) == 24


def test_unicode_spaces_and_quotes_in_names_work(ws: Path) -> None:
    """Class folders and files with spaces, quotes and non-ASCII keep their exact names as paths and labels."""
    classes = ("Chat noir é", 'l\'oiseau "bleu" 🐦')
    for ci, c in enumerate(classes):
        (ws / "raw" / c).mkdir(parents=True)
        for i in range(6):
            class_image(ci, i).save(ws / "raw" / c / f"photo {i} «ü» 'q' \"dq\".png")

    _, m, q = run(ws)

    assert len(q) == 0 and len(m) == 12
    assert read_classes(ws) == sorted(classes)
    assert set(m["label"]) == set(classes)
    expected = {f"{c}/photo {i} «ü» 'q' \"dq\".png" for c in classes for i in range(6)}
    assert set(m["path"]) == expected
    assert all((ws / "raw" / p).is_file() for p in m["path"])


# --- clear errors ----------------------------------------------------------------------------------


def test_too_many_bad_files_fail_with_the_count_and_param_name(ws: Path) -> None:
    """4 bad of 10 (40% > 20%) fails naming the count and ingest.max_bad_fraction; quarantine.csv is written."""
    write_tree(ws / "raw", per_class=3)
    for i in range(2):
        (ws / f"raw/cat/bad{i}.jpg").write_bytes(b"")
        (ws / f"raw/dog/bad{i}.jpg").write_text("nope", encoding="utf-8")

    with pytest.raises(GraftError, match=r"4 of 10 files.*ingest\.max_bad_fraction=0\.2"):
        ingest(make_params(ws))

    assert len(read_quarantine(ws)) == 4
    assert not (ws / "data/manifest.parquet").exists()


def test_bad_fraction_equal_to_the_limit_is_accepted(ws: Path) -> None:
    """The limit is a maximum: exactly max_bad_fraction bad files still pass."""
    write_tree(ws / "raw", per_class=3)
    for i in range(2):
        (ws / f"raw/cat/bad{i}.jpg").write_bytes(b"")
        (ws / f"raw/dog/bad{i}.jpg").write_text("nope", encoding="utf-8")

    summary, m, _ = run(ws, {"ingest": {"max_bad_fraction": 0.4}})

    assert summary["quarantined"] == 4 and len(m) == 6


def test_empty_class_folder_is_an_error_naming_it(ws: Path) -> None:
    """A class folder with no images (only a text file) stops ingest and names the folder."""
    write_tree(ws / "raw", per_class=4)
    (ws / "raw/bird of prey").mkdir()
    (ws / "raw/bird of prey/notes.txt").write_text("todo", encoding="utf-8")

    with pytest.raises(GraftError, match="class folder 'bird of prey' has no images"):
        ingest(make_params(ws))


def test_one_class_only_is_an_error(ws: Path) -> None:
    """A classifier needs two classes."""
    write_tree(ws / "raw", classes=("cat",), per_class=6)

    with pytest.raises(GraftError, match=r"need at least 2 classes.*only 'cat'"):
        ingest(make_params(ws))


def test_no_images_is_an_error(ws: Path) -> None:
    """An empty data root is an error, not an empty manifest."""
    with pytest.raises(GraftError, match="no usable images found"):
        ingest(make_params(ws))
    assert not (ws / "data/manifest.parquet").exists()


def test_missing_root_is_an_error(ws: Path) -> None:
    """A data.root that does not exist names the path."""
    missing = ws / "no such dir"

    with pytest.raises(GraftError, match="no such dir.*does not exist"):
        ingest(make_params(ws, {"data": {"root": str(missing)}}))


# --- splits by content hash ---------------------------------------------------------------------


def test_split_is_the_hash_split_of_each_image(ws: Path) -> None:
    """Without pre-split folders every row's split is hash_split(sha256)."""
    write_tree(ws / "raw", per_class=20)
    fractions = SplitParams(train=0.5, val=0.25, test=0.25)

    _, m, _ = run(ws, {"data": {"split": fractions.model_dump()}})

    assert all(row.split == hash_split(row.sha256, fractions) for row in m.itertuples())
    assert set(m["split"]) == set(SPLITS)


def test_splits_are_stable_when_data_grows(ws: Path) -> None:
    """Adding images never moves an image that was already there."""
    write_tree(ws / "raw", per_class=12)
    _, before, _ = run(ws)
    for ci, c in enumerate(("cat", "dog")):
        for i in range(12, 40):
            class_image(ci, i).save(ws / "raw" / c / f"new-{i}.png")

    _, after, _ = run(ws)

    assert len(after) == 80
    old = before.set_index("path")["split"]
    assert after.set_index("path")["split"].loc[old.index].equals(old)


def test_exact_duplicates_under_one_label_share_a_split(ws: Path) -> None:
    """Copies of one file under the same label all land in the same split and are counted."""
    write_tree(ws / "raw", per_class=12)
    for k in range(3):
        shutil.copyfile(ws / "raw/cat/cat-000.png", ws / f"raw/cat/copy-{k}.png")

    summary, m, q = run(ws)

    copies = m[m["sha256"] == m.set_index("path").loc["cat/cat-000.png", "sha256"]]
    assert len(copies) == 4 and copies["split"].nunique() == 1
    assert summary["duplicate_images"] == 3 and len(q) == 0


def test_same_bytes_under_two_labels_are_quarantined_by_default(ws: Path) -> None:
    """Both copies go to quarantine with a reason naming both labels."""
    write_tree(ws / "raw", per_class=12)
    shutil.copyfile(ws / "raw/cat/cat-003.png", ws / "raw/dog/looks-like-a-dog.png")

    summary, m, q = run(ws)

    r = reasons(q)
    assert set(r) == {"cat/cat-003.png", "dog/looks-like-a-dog.png"}
    assert all("cat" in why and "dog" in why for why in r.values())
    assert not set(r) & set(m["path"])
    assert summary["label_conflicts"] == 1 and summary["quarantined"] == 2 and len(m) == 23


def test_same_bytes_under_two_labels_are_kept_with_keep(ws: Path) -> None:
    """label_conflicts: keep keeps both rows, in one split, and still reports the conflict."""
    write_tree(ws / "raw", per_class=12)
    shutil.copyfile(ws / "raw/cat/cat-003.png", ws / "raw/dog/looks-like-a-dog.png")

    summary, m, q = run(ws, {"ingest": {"label_conflicts": "keep"}})

    both = m[m["path"].isin(["cat/cat-003.png", "dog/looks-like-a-dog.png"])]
    assert sorted(both["label"]) == ["cat", "dog"]
    assert both["split"].nunique() == 1
    assert summary["label_conflicts"] == 1 and len(q) == 0 and len(m) == 25


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.3, 0.2), (0.8, 0.0, 0.2)])
def test_hash_split_proportions_match_params(fractions: tuple[float, float, float]) -> None:
    """Over 3000 random hashes each split's share is within 0.03 of its fraction."""
    rng = np.random.default_rng(42)
    params = SplitParams(train=fractions[0], val=fractions[1], test=fractions[2])
    hashes = [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(3000)]

    got = pd.Series([hash_split(h, params) for h in hashes]).value_counts(normalize=True)

    for name, want in zip(SPLITS, fractions, strict=True):
        assert abs(got.get(name, 0.0) - want) <= 0.03, (name, got.to_dict())


def test_hash_split_is_deterministic() -> None:
    """The same hash always maps to the same split."""
    h = hashlib.sha256(b"one image").hexdigest()
    assert len({hash_split(h, SplitParams()) for _ in range(5)}) == 1


# --- pre-split folders ---------------------------------------------------------------------------


def write_presplit(raw: Path, counts: dict[str, int]) -> None:
    """raw/<split>/<class>/ with distinct generated images (distinct seeds per split)."""
    for si, (split, n) in enumerate(counts.items()):
        for ci, c in enumerate(("cat", "dog")):
            (raw / split / c).mkdir(parents=True)
            for i in range(n):
                class_image(ci, 100 * si + i).save(raw / split / c / f"{c}-{i}.png")


def test_presplit_folders_give_the_split_and_class_folders_the_label(ws: Path) -> None:
    """raw/{train,val,test}/<class>: the split is the top folder, the label the class folder."""
    write_presplit(ws / "raw", {"train": 6, "val": 2, "test": 3})

    summary, m, _ = run(ws)

    assert len(m) == 22
    assert all(row.split == row.path.split("/")[0] for row in m.itertuples())
    assert all(row.label == row.path.split("/")[1] for row in m.itertuples())
    assert (summary["train"], summary["val"], summary["test"]) == (12, 4, 6)
    assert read_classes(ws) == ["cat", "dog"]
    assert summary["duplicates_moved_to_one_split"] == 0


def test_presplit_duplicate_across_splits_is_pulled_into_train(ws: Path) -> None:
    """The same bytes in train/ and test/ end up together in train, and the move is reported."""
    write_presplit(ws / "raw", {"train": 6, "val": 2, "test": 3})
    shutil.copyfile(ws / "raw/train/cat/cat-0.png", ws / "raw/test/cat/leaked.png")

    summary, m, _ = run(ws)

    by_path = m.set_index("path")["split"]
    assert by_path["test/cat/leaked.png"] == by_path["train/cat/cat-0.png"] == "train"
    assert summary["duplicates_moved_to_one_split"] == 1
    assert summary["test"] == 6


# --- manifest input ---------------------------------------------------------------------------------


def write_flat_images(raw: Path, per_class: int = 12) -> pd.DataFrame:
    """Images in one folder (labels not in the path); return their path,label table."""
    (raw / "pool").mkdir(parents=True)
    rows = []
    for ci, c in enumerate(("cat", "dog")):
        for i in range(per_class):
            name = f"pool/img {ci}-{i}.png"
            class_image(ci, i).save(raw / name)
            rows.append({"path": name, "label": c})
    return pd.DataFrame(rows)


def test_csv_manifest_labels_come_from_the_csv(ws: Path) -> None:
    """A path,label CSV is ingested with hash splits and the CSV's labels."""
    table = write_flat_images(ws / "raw")
    table.to_csv(ws / "labels.csv", index=False)

    summary, m, q = run(ws, {"data": {"manifest": str(ws / "labels.csv")}})

    assert len(q) == 0 and len(m) == 24
    assert dict(zip(m["path"], m["label"], strict=True)) == dict(zip(table["path"], table["label"], strict=True))
    assert all(row.split == hash_split(row.sha256, SplitParams()) for row in m.itertuples())
    assert read_classes(ws) == ["cat", "dog"]


def test_csv_manifest_split_column_is_used(ws: Path) -> None:
    """An explicit split column overrides the hash split."""
    table = write_flat_images(ws / "raw")
    table["split"] = (["train"] * 8 + ["val"] * 2 + ["test"] * 2) * 2
    table.to_csv(ws / "labels.csv", index=False)

    _, m, _ = run(ws, {"data": {"manifest": str(ws / "labels.csv")}})

    assert dict(zip(m["path"], m["split"], strict=True)) == dict(zip(table["path"], table["split"], strict=True))


def test_parquet_manifest_is_accepted(ws: Path) -> None:
    """The same table as Parquet works too."""
    table = write_flat_images(ws / "raw")
    table.to_parquet(ws / "labels.parquet", index=False)

    _, m, q = run(ws, {"data": {"manifest": str(ws / "labels.parquet")}})

    assert len(q) == 0
    assert dict(zip(m["path"], m["label"], strict=True)) == dict(zip(table["path"], table["label"], strict=True))


def test_manifest_path_escaping_the_root_is_quarantined(ws: Path) -> None:
    """../../etc/passwd and an absolute path outside the root are refused before anything is read."""
    table = write_flat_images(ws / "raw")
    evil = pd.DataFrame({"path": ["../../etc/passwd", "/etc/hostname"], "label": ["cat", "dog"]})
    pd.concat([table, evil]).to_csv(ws / "labels.csv", index=False)

    _, m, q = run(ws, {"data": {"manifest": str(ws / "labels.csv")}})

    assert reasons(q) == {
        "../../etc/passwd": "path escapes the data root",
        "/etc/hostname": "path escapes the data root",
    }
    assert len(m) == 24


def test_manifest_rejects_count_towards_the_bad_fraction_denominator(ws: Path) -> None:
    """4 rejected rows of 20 is 20%: at the default limit that passes (not 4 of 16 = 25%)."""
    table = write_flat_images(ws / "raw", per_class=8)
    evil = pd.DataFrame({"path": [f"../outside-{i}.png" for i in range(4)], "label": ["cat"] * 4})
    pd.concat([table, evil]).to_csv(ws / "labels.csv", index=False)

    summary, m, _ = run(ws, {"data": {"manifest": str(ws / "labels.csv")}})

    assert summary["quarantined"] == 4 and len(m) == 16


def test_manifest_missing_label_column_is_an_error(ws: Path) -> None:
    """A manifest without a label column names what it lacks."""
    table = write_flat_images(ws / "raw").rename(columns={"label": "class"})
    table.to_csv(ws / "labels.csv", index=False)

    with pytest.raises(GraftError, match=r"lacks column\(s\) \['label'\]"):
        ingest(make_params(ws, {"data": {"manifest": str(ws / "labels.csv")}}))


# --- orientation and reruns -------------------------------------------------------------------------


def test_exif_rotated_image_records_its_upright_size(ws: Path) -> None:
    """A 60x40 JPEG stored with EXIF orientation 6 is 40 wide and 60 high in the manifest."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/rotated.jpg").write_bytes(rotated_jpeg(6))

    _, m, _ = run(ws)

    row = m.set_index("path").loc["cat/rotated.jpg"]
    assert (row["width"], row["height"]) == (40, 60)


def test_rerun_with_nothing_changed_writes_identical_outputs(ws: Path) -> None:
    """Ingest is deterministic: same manifest, quarantine and class map on a rerun (4 decoding threads)."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/broken.jpg").write_bytes(truncated_jpeg())
    (ws / "raw/dog/rotated.jpg").write_bytes(rotated_jpeg(8))
    overrides = {"ingest": {"workers": 4}}
    s1, m1, _ = run(ws, overrides)
    q1 = (ws / "data/quarantine.csv").read_bytes()
    c1 = (ws / "data/classes.json").read_bytes()

    s2, m2, _ = run(ws, overrides)

    pd.testing.assert_frame_equal(m1, m2)
    assert (ws / "data/quarantine.csv").read_bytes() == q1
    assert (ws / "data/classes.json").read_bytes() == c1
    assert s1 == s2
    assert m2["width"].dtype == m2["height"].dtype == np.int32


def test_symlinked_class_folder_outside_the_root_is_read_when_allowed(ws: Path) -> None:
    """With ingest.allow_links_outside_root, raw/bird -> a folder elsewhere is a class like any other."""
    write_tree(ws / "raw", per_class=6)
    write_tree(ws / "elsewhere", classes=("x", "y", "bird"), per_class=6)  # bird: a third colour, new bytes
    os.symlink(ws / "elsewhere/bird", ws / "raw/bird")

    summary, m, _ = run(ws, {"ingest": {"allow_links_outside_root": True}})

    assert read_classes(ws) == ["bird", "cat", "dog"]
    assert (m["label"] == "bird").sum() == 6 and summary["images"] == 18


def test_loose_readme_at_the_root_is_ignored_but_a_loose_image_is_quarantined(ws: Path) -> None:
    """Non-image files at the top are not faults; an image with no class folder is recorded."""
    write_tree(ws / "raw", per_class=6)
    (ws / "raw/README.md").write_text("about this data")
    class_image(0, 99).save(ws / "raw/stray.png")

    summary, _, q = run(ws)

    assert reasons(q) == {"stray.png": "not inside a class folder"}
    assert summary["ignored_non_images"] == 1
