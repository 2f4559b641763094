"""Fault rows 1-4, 12 and 23: files that are not usable images, odd trees, and huge photos."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from graft import GraftError
from graft.cli import main
from graft.images import load_rgb
from graft.tasks.ingest import ingest
from tests.faults.helpers import (
    encode,
    params_for,
    png_bytes,
    raw_png,
    read_quarantine,
    reasons,
    run_ingest,
    truncated_jpeg,
    write_params,
)
from tests.helpers import REPO, class_image, write_tree


def test_truncated_jpeg_is_quarantined(ws: Path) -> None:
    """A JPEG cut in half opens (its header is whole) but ingest's full decode catches it."""
    write_tree(ws / "raw", per_class=12)
    data = truncated_jpeg()
    assert Image.open(io.BytesIO(data)).size == (64, 48)  # Image.open alone would accept it
    (ws / "raw/cat/cut.jpg").write_bytes(data)

    summary, m, q = run_ingest(ws)

    assert reasons(q)["cat/cut.jpg"].startswith("cannot decode")
    assert "cat/cut.jpg" not in set(m["path"])
    assert summary["quarantined"] == 1 and len(m) == 24


def test_zero_byte_text_and_unknown_format_are_quarantined(ws: Path) -> None:
    """Empty file, text named .jpg, a PCX named .png and a bare PNG signature each get a reason."""
    write_tree(ws / "raw", per_class=12)
    (ws / "raw/cat/empty.jpg").write_bytes(b"")
    (ws / "raw/cat/letter.jpg").write_text("Dear diary, not a photo.\n", encoding="utf-8")
    (ws / "raw/dog/pcx.png").write_bytes(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PCX"))
    (ws / "raw/dog/sig.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    _, m, q = run_ingest(ws, {"ingest": {"max_bad_fraction": 0.5}})

    assert reasons(q) == {
        "cat/empty.jpg": "empty file (0 bytes)",
        "cat/letter.jpg": "not a recognised image format",
        "dog/pcx.png": "not a recognised image format",
        "dog/sig.png": "not a recognised image format",
    }
    assert len(m) == 24


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_quarantined_without_decoding(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers claiming 1e10 and 1e8 pixels are refused from the header alone: no pixels are ever decoded."""
    write_tree(ws / "raw", per_class=12)
    rows = b"\0" + b"\0" * 3 * 4  # one scanline of a tiny image; the header lies about the size
    (ws / "raw/cat/bomb.png").write_bytes(raw_png(100_000, 100_000, 8, 2, rows))
    (ws / "raw/dog/bomb.png").write_bytes(raw_png(10_000, 10_000, 8, 2, rows))  # 1e8 px: Pillow itself only warns
    sizes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: sizes.append(self.size) or real_load(self))

    _, m, q = run_ingest(ws)

    r = reasons(q)
    assert set(r) == {"cat/bomb.png", "dog/bomb.png"}
    assert all(why.startswith("decompression bomb") for why in r.values()), r
    assert (100_000, 100_000) not in sizes and (10_000, 10_000) not in sizes
    assert len(m) == 24


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_just_over_the_pixel_limit_is_quarantined(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; ingest still refuses (a warning filter is global)."""
    write_tree(ws / "raw", per_class=12)  # 40x32 = 1280 px each
    (ws / "raw/cat/big.png").write_bytes(encode(Image.new("RGB", (150, 100), (5, 6, 7)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 15000 px: in Pillow's warning-only range

    _, m, q = run_ingest(ws)

    assert reasons(q) == {"cat/big.png": "decompression bomb: 150x100 is more than 10000 pixels"}
    assert len(m) == 24


def test_mostly_unreadable_fails_with_the_count_and_threshold(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """5 bad of 11 files fails with the count and the param name, as one CLI line; the quarantine is kept."""
    write_tree(ws / "raw", per_class=3)
    for i in range(3):
        (ws / f"raw/cat/bad{i}.jpg").write_bytes(b"")
    for i in range(2):
        (ws / f"raw/dog/bad{i}.jpg").write_bytes(truncated_jpeg(seed=i))
    params_path = write_params(ws, params_for(ws))

    with pytest.raises(GraftError, match=r"^5 of 11 files are unusable \(45% > ingest\.max_bad_fraction=0\.2\)"):
        ingest(params_for(ws))
    rc = main(["ingest", "--params", str(params_path)])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("graft: error: 5 of 11 files are unusable")
    assert len(read_quarantine(ws)) == 5
    assert not (ws / "data/manifest.parquet").exists()


@pytest.mark.timeout(60)
def test_hidden_non_image_symlink_loops_and_unicode_names_never_crash(ws: Path) -> None:
    """Hidden entries and non-images are skipped, links looping back are not followed, odd names kept exactly."""
    classes = ("Chat noir é", 'l\'oiseau "bleu" 🐦')
    for ci, c in enumerate(classes):
        (ws / "raw" / c).mkdir(parents=True)
        for i in range(6):
            class_image(ci, i).save(ws / "raw" / c / f"photo {i} «ü» 'q' \"dq\".png")
    cat = ws / "raw" / classes[0]
    (cat / ".hidden.png").write_bytes(png_bytes(0, 60))
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / ".thumbs").mkdir()
    (cat / ".thumbs/t.png").write_bytes(png_bytes(0, 61))
    (cat / "notes.txt").write_text("shot in 2019", encoding="utf-8")
    (cat / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    os.symlink("..", cat / "up")  # loops back to raw/
    os.symlink(".", ws / "raw" / classes[1] / "self")  # loops onto itself
    os.symlink(ws / "raw", ws / "raw/again")  # a "class folder" that is the root
    os.symlink(ws / "nowhere.png", cat / "dangling.png")  # broken link to an image name
    (ws / "raw/.git").mkdir()
    (ws / "raw/.git/logo.png").write_bytes(png_bytes(1, 62))

    summary, m, q = run_ingest(ws)

    assert len(m) == 12 and m["path"].is_unique
    assert set(m["label"]) == set(classes)
    assert {f"{c}/photo {i} «ü» 'q' \"dq\".png" for c in classes for i in range(6)} == set(m["path"])
    assert reasons(q) == {f"{classes[0]}/dangling.png": reasons(q)[f"{classes[0]}/dangling.png"]}
    assert reasons(q)[f"{classes[0]}/dangling.png"].startswith("cannot read file")
    assert summary["ignored_non_images"] == 2  # notes.txt, Thumbs.db
    assert json.loads((ws / "data/classes.json").read_text(encoding="utf-8"))["classes"] == sorted(classes)


_PEAK_RSS = """
import sys
from graft.images import load_rgb
def hwm():  # peak resident memory of this process (ru_maxrss would include the forking parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
img, size = load_rgb(sys.argv[1], min_side=int(sys.argv[2]) or None)
print(img.size[0], img.size[1], size[0], size[1], hwm() - before)
"""


def _peak_decode(path: Path, min_side: int) -> tuple[tuple[int, int], tuple[int, int], float]:
    """Decode ``path`` in a fresh process; return the decoded size, the reported size and the peak RSS growth (MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path), str(min_side)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    w, h, ow, oh, grew_kib = map(int, out)
    return (w, h), (ow, oh), grew_kib / 1024


@pytest.mark.timeout(120)
def test_huge_jpeg_is_decoded_at_reduced_size_with_bounded_memory(ws: Path) -> None:
    """An 8000x6000 JPEG: ingest records its true size, decoding uses a few MiB instead of ~140, pixels are right."""
    write_tree(ws / "raw", per_class=12)
    arr = np.zeros((6000, 8000, 3), np.uint8)
    arr[:, :4000] = (200, 30, 30)  # left half red, right half blue: the reduced decode must keep the geometry
    arr[:, 4000:] = (30, 30, 200)
    path = ws / "raw/cat/huge.jpg"
    path.write_bytes(encode(Image.fromarray(arr), "JPEG", quality=85))
    del arr

    _, m, _ = run_ingest(ws)
    drafted, size, grew = _peak_decode(path, 36)  # tiny_cnn's resize: what featurize asks for
    full, _, grew_full = _peak_decode(path, 0)  # control: the same decode without a draft

    row = m.set_index("path").loc["cat/huge.jpg"]
    assert (row["width"], row["height"]) == size == (8000, 6000)
    assert full == (8000, 6000) and grew_full > 100  # the measurement sees a full decode
    assert drafted == (1000, 750) and grew < 20  # 1/8 scale: shorter side still >= 36
    img, _ = load_rgb(path, min_side=256)
    px = np.asarray(img).astype(int)
    np.testing.assert_allclose(px[:, : px.shape[1] // 2 - 4].reshape(-1, 3).mean(0), (200, 30, 30), atol=4)
    np.testing.assert_allclose(px[:, px.shape[1] // 2 + 4 :].reshape(-1, 3).mean(0), (30, 30, 200), atol=4)
