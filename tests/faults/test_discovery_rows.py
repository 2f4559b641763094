"""Nothing found under data.root vanishes without a row: folders that cannot be listed, over-long paths
and image formats graft cannot decode each get a quarantine record (they used to be dropped silently)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.helpers import reasons, run_ingest
from tests.helpers import write_tree


def test_a_folder_that_cannot_be_listed_gets_a_row(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sub-folder os.walk cannot open (EACCES) is recorded with the reason, the rest is ingested."""
    write_tree(ws / "raw", per_class=8)
    locked = ws / "raw/cat/locked"
    locked.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(locked / "hidden-away.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # tests run as root here, where chmod 000 would not stop a read
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    _, manifest, q = run_ingest(ws)

    assert reasons(q) == {"cat/locked": "cannot list folder: Permission denied"}
    assert len(manifest) == 16


def _deep_file(base: Path, depth: int, data: bytes) -> None:
    """``base/ddd.../deep.png`` nested past PATH_MAX (made relative to open folders, which the kernel allows)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def test_an_over_long_path_gets_a_row(ws: Path) -> None:
    """A folder nested past PATH_MAX cannot be listed by path: one row says so instead of silence."""
    write_tree(ws / "raw", per_class=8)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(buf, "PNG")
    _deep_file(ws / "raw/dog", 25, buf.getvalue())  # 25 x 201 characters: past Linux's 4096

    _, manifest, q = run_ingest(ws)

    (row,) = q.to_dict("records")
    assert row["path"].startswith("dog/" + "d" * 200)
    assert len(str(ws / "raw" / row["path"])) >= 4096  # the first folder whose absolute path is past PATH_MAX
    assert row["reason"] == "cannot list folder: File name too long"
    assert len(manifest) == 16


def test_svg_heic_and_avif_files_are_recorded_not_dropped(ws: Path) -> None:
    """Image formats Pillow cannot decode get a row naming the format; AVIF is read where Pillow can."""
    write_tree(ws / "raw", per_class=8)
    (ws / "raw/cat/logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>', encoding="utf-8")
    (ws / "raw/dog/phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(32))
    avif = io.BytesIO()
    arr = np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    try:
        Image.fromarray(arr).save(avif, "AVIF")  # Pillow >= 11.2 built with libavif
    except (KeyError, OSError):  # a Pillow without AVIF: a file that only looks like one
        avif.write(b"\0\0\0\x1cftypavif" + bytes(32))
    (ws / "raw/dog/new.avif").write_bytes(avif.getvalue())

    summary, manifest, q = run_ingest(ws)

    r = reasons(q)
    assert r["cat/logo.svg"] == "unsupported image format (SVG): convert it to PNG or JPEG"
    assert r["dog/phone.heic"] == "unsupported image format (HEIC): convert it to PNG or JPEG"
    assert "dog/new.avif" in set(manifest["path"]) | set(r)  # decoded, or a row saying why not
    assert summary["ignored_non_images"] == 0
