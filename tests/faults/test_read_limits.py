"""Reads are bounded: ``ingest.max_file_bytes`` before and while reading, and symlinks that leave
``data.root`` are refused in folder mode (as manifest paths already were) unless params allow them.

Before the fix a link to ``/dev/zero`` was read until memory ran out (3.5 GB in 4.7 s, then a
``MemoryError`` traceback); the tests below never let a read start on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from tests.faults.helpers import png_bytes, reasons, run_ingest
from tests.helpers import class_image, write_tree

OUTSIDE = "symbolic link leading outside the data root (set ingest.allow_links_outside_root to read it)"


def test_a_link_to_dev_zero_is_refused_without_a_read(ws: Path) -> None:
    """By default the link is refused for leaving the root; allowed, it is refused as a device: never opened."""
    write_tree(ws / "raw", per_class=8)
    os.symlink("/dev/zero", ws / "raw/cat/zero.png")

    _, manifest, q = run_ingest(ws)
    assert reasons(q) == {"cat/zero.png": OUTSIDE}

    _, manifest, q = run_ingest(ws, {"ingest": {"allow_links_outside_root": True}})
    assert reasons(q) == {"cat/zero.png": "not a regular file (a character device): only regular files are read"}
    assert len(manifest) == 16


def test_a_file_over_ingest_max_file_bytes_is_quarantined_unread(ws: Path) -> None:
    """A valid image larger than the limit is refused from its size alone, with the key named."""
    write_tree(ws / "raw", per_class=8)
    big = ws / "raw/cat/big.png"
    class_image(0, 50, size=(400, 300)).save(big)  # noise: tens of KB, over the limit below
    size = big.stat().st_size
    limit = max(len(png_bytes(i % 2, i)) for i in range(8)) + 100  # every small image fits

    _, manifest, q = run_ingest(ws, {"ingest": {"max_file_bytes": limit}})

    assert reasons(q) == {"cat/big.png": f"file is {size} bytes, over the {limit}-byte limit (ingest.max_file_bytes)"}
    assert "cat/big.png" not in set(manifest["path"])


def test_a_file_whose_size_stat_does_not_know_is_stopped_while_reading(tmp_path: Path) -> None:
    """/proc files report size 0 and still hold data: the read itself stops at the limit."""
    from graft.images import RefusedFile, read_regular

    status = Path("/proc/self/status")
    assert status.stat().st_size == 0 and len(status.read_bytes()) > 64

    with pytest.raises(RefusedFile, match=r"^file grew past the 64-byte limit while read \(ingest.max_file_bytes\)$"):
        read_regular(status, 64)
    assert read_regular(status, 1 << 20).startswith(b"Name:")


def test_fsspec_reads_are_bounded_too() -> None:
    """graft.sources.read_bytes (featurize, predict over URLs) applies the same limit to a URL."""
    from graft.images import RefusedFile
    from graft.sources import read_bytes

    fs = fsspec.filesystem("memory")
    fs.pipe("/limits/big.png", b"x" * 5000)
    fs.pipe("/limits/small.png", b"y" * 100)

    with pytest.raises(RefusedFile, match="5000 bytes, over the 1000-byte limit"):
        read_bytes("memory://limits/big.png", 1000)
    assert read_bytes("memory://limits/small.png", 1000) == b"y" * 100


def test_a_symlink_leaving_the_root_is_refused_in_folder_mode_unless_allowed(ws: Path) -> None:
    """File and folder links out of data.root are quarantined by default; ingest.allow_links_outside_root reads them."""
    write_tree(ws / "raw", per_class=8)
    write_tree(ws / "elsewhere", classes=("x", "y", "bird"), per_class=6)  # bird: a third colour, new bytes
    os.symlink(ws / "elsewhere/x/x-000.png", ws / "raw/cat/borrowed.png")
    os.symlink(ws / "elsewhere/bird", ws / "raw/bird")

    _, manifest, q = run_ingest(ws)
    assert reasons(q) == {"cat/borrowed.png": OUTSIDE, "bird": OUTSIDE}
    assert set(manifest["label"]) == {"cat", "dog"} and len(manifest) == 16

    _, manifest, q = run_ingest(ws, {"ingest": {"allow_links_outside_root": True}})
    assert len(q) == 0
    assert "cat/borrowed.png" in set(manifest["path"]) and (manifest["label"] == "bird").sum() == 6
