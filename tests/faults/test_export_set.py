"""Export publishes its set (model.onnx, model.int8.onnx, metrics/export.json, reports/export_latency.json)
together or not at all, and a rerun first completes or cleans up what a killed run left.

The killed runs are the real CLI under tests/faults/slow_cli.py, which delays every ``os.replace``
in the workspace, so the kill lands at a known step of the publish. The rerun is made to fail right
after its first step (model.pt removed): what it leaves shows what recovery alone did.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from graft.cli import main
from graft.tasks.export import export
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.faults.helpers import output_of, params_for, start_graft, tmp_files, wait_until, write_params
from tests.helpers import write_tree

pytestmark = pytest.mark.timeout(300)
SMALL = {"export": {"calibration_images": 8}, "train": {"max_epochs": 20}}
JOURNAL = ".model.onnx.publish.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _exported_then_retrained(ws: Path) -> tuple[Path, dict[str, str]]:
    """A workspace exported once (the old set), then retrained with another learning rate (the next set differs).

    Returns the params file of the retrained model and the old set's sha256 per file.
    """
    write_tree(ws / "raw", per_class=10)
    params = params_for(ws, SMALL)
    for stage in (ingest, featurize, train, export):
        stage(params)
    old = {"fp32": _sha(ws / "models/model.onnx"), "int8": _sha(ws / "models/model.int8.onnx")}
    params = params_for(ws, {**SMALL, "train": {"max_epochs": 20, "lr": 0.05}})
    train(params)
    return write_params(ws, params), old


def _consistent(ws: Path) -> dict[str, str]:
    """The set on disk describes itself: export.json's sha256 of each model is the file's; returns them."""
    report = json.loads((ws / "metrics/export.json").read_text())
    shas = {k: _sha(ws / "models" / name) for k, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
    assert {k: report[k]["sha256"] for k in shas} == shas
    assert (ws / "reports/export_latency.json").is_file()
    return shas


def _rerun_that_stops_after_recovery(ws: Path, path: Path, capsys) -> None:
    (ws / "models/model.pt").unlink()
    assert main(["export", "--params", str(path)]) == 2
    assert "model.pt not found" in capsys.readouterr().err


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_kill_after_the_commit_point_is_completed_by_the_next_run(ws: Path, capsys) -> None:
    """Killed between the fp32 and the int8 rename: the rerun finishes the publish, so the new set is whole."""
    path, old = _exported_then_retrained(ws)
    proc = start_graft("export", "--params", str(path), cwd=ws, slow=1.0)
    models = ws / "models"
    wait_until(lambda: (models / JOURNAL).is_file() and _sha(models / "model.onnx") != old["fp32"], proc)
    _kill(proc)
    assert _sha(models / "model.int8.onnx") == old["int8"], output_of(proc)  # the moment the issue describes

    _rerun_that_stops_after_recovery(ws, path, capsys)

    shas = _consistent(ws)
    assert shas["fp32"] != old["fp32"] and shas["int8"] != old["int8"]
    assert not (models / JOURNAL).exists() and tmp_files(ws) == []


def test_a_kill_before_the_commit_point_leaves_the_old_set_and_the_rerun_cleans_up(ws: Path, capsys) -> None:
    """Killed while the journal is being written: the old set is untouched; temp files and a quantizer's
    scratch folder left behind are removed by the next run."""
    path, old = _exported_then_retrained(ws)
    proc = start_graft("export", "--params", str(path), cwd=ws, slow=1.0)
    models = ws / "models"
    wait_until(lambda: any(models.glob(f".{JOURNAL}.*.tmp")), proc)  # the journal's own temporary file
    _kill(proc)
    assert len(tmp_files(ws)) >= 4, output_of(proc)  # the new set, waiting beside the old one
    (models / ".quantize.x1y2z3").mkdir()  # what a kill during quantization leaves
    (models / ".quantize.x1y2z3/pre.onnx").write_bytes(b"partial")

    _rerun_that_stops_after_recovery(ws, path, capsys)

    assert _consistent(ws) == old
    assert tmp_files(ws) == [] and not list(models.glob(".quantize.*"))
