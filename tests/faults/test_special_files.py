"""FIFOs, sockets and devices among the images: decided by ``stat`` before any open, never read.

Opening a FIFO for reading blocks until a writer comes, so the old behaviour was a hang. Each test
keeps a "rescuer" thread that opens the FIFO for writing whenever someone waits on it: code that
wrongly opens the FIFO then reads an empty file instead of hanging the suite, and the test fails
on what it finds (and on the rescuer having been needed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graft import GraftError
from graft.images import Preprocess
from graft.predict import list_images, predict_files
from graft.tasks.featurize import featurize
from tests.faults.helpers import params_for, reasons, run_ingest
from tests.helpers import write_tree

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[list[bool]]:
    """A FIFO at ``path``; yields a list that gets an entry each time a reader had opened it (and was rescued)."""
    os.mkfifo(path)
    stop, rescued = threading.Event(), []

    def rescue() -> None:
        while not stop.is_set():
            try:  # succeeds only while a reader has the FIFO open (or waits in open)
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
                continue
            rescued.append(True)
            os.close(fd)  # the reader sees end of file
            time.sleep(0.1)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield rescued
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def unix_socket(path: Path) -> Iterator[None]:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        yield


def test_fifo_socket_and_device_in_class_folders_are_quarantined_unopened(ws: Path) -> None:
    """A FIFO, a socket and a link to a character device named like images: one quarantine row each, none opened."""
    write_tree(ws / "raw", per_class=8)
    os.symlink("/dev/null", ws / "raw/dog/null.png")
    with fifo(ws / "raw/cat/y.png") as rescued, unix_socket(ws / "raw/dog/s.png"):
        summary, manifest, q = run_ingest(ws, {"ingest": {"allow_links_outside_root": True}})

    assert rescued == []  # nobody opened the FIFO
    assert reasons(q) == {
        "cat/y.png": "not a regular file (a FIFO): only regular files are read",
        "dog/s.png": "not a regular file (a socket): only regular files are read",
        "dog/null.png": "not a regular file (a character device): only regular files are read",
    }
    assert len(manifest) == 16 and summary["quarantined"] == 3


def test_fifo_listed_in_a_manifest_is_quarantined_unopened(tmp_path: Path) -> None:
    """The manifest path goes through the same stat check as a discovered file."""
    write_tree(tmp_path / "raw", per_class=8)
    rows = [
        {"path": p.relative_to(tmp_path / "raw").as_posix(), "label": p.parent.name}
        for p in sorted((tmp_path / "raw").rglob("*.png"))
    ]
    rows.append({"path": "cat/pipe.png", "label": "cat"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with fifo(tmp_path / "raw/cat/pipe.png") as rescued:
        _, manifest, q = run_ingest(tmp_path, {"data": {"manifest": str(tmp_path / "labels.csv")}})

    assert rescued == []
    assert reasons(q) == {"cat/pipe.png": "not a regular file (a FIFO): only regular files are read"}
    assert len(manifest) == 16


class _StubModel:
    """What predict_files needs from an OnnxClassifier: preprocessing, class names, probabilities."""

    preprocess = Preprocess(8, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    classes = ["cat", "dog"]

    unknown_below = None  # no in-distribution output

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[0.75, 0.25]], np.float32), (len(batch), 1))

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
        return self.predict_arrays(batch), None


def test_predict_on_a_folder_holding_a_fifo_reports_it_and_goes_on(ws: Path) -> None:
    """`graft predict` lists the FIFO (it is named like an image) and records why it was skipped, unopened."""
    write_tree(ws / "raw", per_class=2)
    with fifo(ws / "raw/cat/live.png") as rescued:
        records = list(predict_files(_StubModel(), list_images(ws / "raw")))

    assert rescued == []
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["live.png"]["error"] == "not a regular file (a FIFO): only regular files are read"
    assert sum(r["error"] is None and r["predicted"] == "cat" for r in records) == 4


def test_featurize_refuses_a_fifo_swapped_in_after_ingest(ws: Path) -> None:
    """A file replaced by a FIFO between ingest and featurize: one-line error naming it, not a hang or a retry."""
    write_tree(ws / "raw", per_class=6)
    params = params_for(ws)
    run_ingest(ws)
    victim = ws / "raw/dog/dog-002.png"
    victim.unlink()
    with fifo(victim) as rescued, pytest.raises(GraftError) as info:
        featurize(params)

    assert rescued == []
    assert str(info.value) == (f"{victim}: not a regular file (a FIFO): only regular files are read; rerun ingest")
