"""Fault rows 13 and 14: a stage that fails midway, and real `graft` processes killed with SIGKILL.

The killed runs are the real CLI (``python -m graft.cli`` through tests/faults/slow_cli.py, which
only delays each atomic ``os.replace``) so the kill lands at a known moment: after some outputs were
published and while another finished temp file waits beside its final path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from graft.cli import main
from graft.model import load_model
from tasks.featurize import featurize, load_feature_table
from tasks.finetune import finetune
from tasks.ingest import ingest
from tasks.train_head import train
from tests.conftest import write_tree
from tests.faults.conftest import (output_of, params_for, run_graft, start_graft, tmp_files, wait_until,
                                   write_params)

pytestmark = pytest.mark.timeout(240)

SMALL_PARTS = {"featurize": {"batch_size": 4, "part_rows": 4}}  # many parts: a kill always lands between two


def _parts(ws: Path) -> list[Path]:
    return sorted((ws / "cache").glob("*/part-*.parquet"))


def _part_keys(ws: Path) -> list[str]:
    """Every key in every published cache part (duplicates kept)."""
    return [k for p in _parts(ws) for k in pq.read_table(p, columns=["sha256"]).column(0).to_pylist()]


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _assert_same_features(a: str | Path, b: str | Path) -> None:
    fa, _ = load_feature_table(a)
    fb, _ = load_feature_table(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k


def _twin_workspaces(tmp_path: Path, per_class: int) -> tuple[Path, Path]:
    """Two workspaces with the same images: one for the reference run, one to be interrupted."""
    ref, ws = tmp_path / "ref", tmp_path / "ws"
    for w in (ref, ws):
        write_tree(w / "raw", per_class=per_class)
    return ref, ws


def test_row13_stage_failing_midway_exits_nonzero_leaves_no_partial_file_and_reruns_clean(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """featurize meets a file changed since ingest after some parts: exit 2, one line, no features.parquet;
    once the file is restored the rerun finishes and equals a clean run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=12)
    for w in (ref, ws):
        ingest(params_for(w, SMALL_PARTS))
    featurize(params_for(ref, SMALL_PARTS))
    late = ws / "raw/dog/dog-011.png"  # the last file in manifest order: earlier parts are published first
    original = late.read_bytes()
    late.write_bytes(original[:-30] + b"\0" * 30)
    params_path = write_params(ws, params_for(ws, SMALL_PARTS))

    rc = main(["featurize", "--params", str(params_path)])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "dog-011.png changed since ingest" in err[0]
    assert not (ws / "data/features.parquet").exists()
    assert tmp_files(ws) == []
    published = _part_keys(ws)
    assert 0 < len(published) < 24 and len(set(published)) == len(published)
    assert all(pq.read_table(p).num_rows == 4 for p in _parts(ws))  # whole parts only
    late.write_bytes(original)
    assert main(["featurize", "--params", str(params_path)]) == 0
    _assert_same_features(ws / "data/features.parquet", ref / "data/features.parquet")
    assert sorted(_part_keys(ws)) == sorted(set(_part_keys(ws)))


def test_row14_sigkill_during_featurize_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Kill `graft featurize` while a cache part is being published: finished parts stay whole, the final
    path is untouched, and the rerun computes only the rest and equals an uninterrupted run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=16)
    for w in (ref, ws):
        ingest(params_for(w, SMALL_PARTS))
    featurize(params_for(ref, SMALL_PARTS))
    params_path = write_params(ws, params_for(ws, SMALL_PARTS))

    proc = start_graft("featurize", "--params", str(params_path), cwd=ws, slow=0.4)
    wait_until(lambda: len(_parts(ws)) >= 2 and any(p.name.startswith(".part-") for p in tmp_files(ws / "cache")), proc)
    _kill(proc)

    published = _part_keys(ws)
    assert 8 <= len(published) < 32 and len(set(published)) == len(published)
    assert all(pq.read_table(p).num_rows == 4 for p in _parts(ws))
    assert not (ws / "data/features.parquet").exists()
    assert [p.name.startswith(".") for p in tmp_files(ws)] == [True]  # the interrupted write: a hidden temp file
    rerun = run_graft("featurize", "--params", str(params_path), cwd=ws)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.splitlines()[-1])["featurize"]
    assert (summary["computed"], summary["from_cache"]) == (32 - len(published), len(published))
    _assert_same_features(ws / "data/features.parquet", ref / "data/features.parquet")
    keys = _part_keys(ws)
    assert len(keys) == len(set(keys)) == 32  # every key exactly once in the cache


FINETUNE = {"train": {"mode": "finetune", "finetune": {"epochs": 3, "strategy": "staged", "head_epochs": 1,
                                                       "batch_size": 8}}}


def test_row14_sigkill_during_finetune_then_rerun_resumes_to_identical_weights(tmp_path: Path) -> None:
    """Kill `graft train` (finetune) while it publishes the epoch-2 checkpoint: the epoch-1 checkpoint is whole,
    no model.pt appears, and the rerun resumes and ends with the weights of an uninterrupted run."""
    ref, ws = _twin_workspaces(tmp_path, per_class=8)
    for w in (ref, ws):
        ingest(params_for(w, FINETUNE))
    finetune(params_for(ref, FINETUNE))
    reference = load_model(ref / "models")
    params_path = write_params(ws, params_for(ws, FINETUNE))
    checkpoints = ws / "models/checkpoints"

    proc = start_graft("train", "--params", str(params_path), cwd=ws, slow=0.6)
    wait_until(lambda: (checkpoints / "last.pt").is_file() and bool(tmp_files(checkpoints)), proc, timeout=180)
    _kill(proc)

    assert torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] == 1
    assert not (ws / "models/model.pt").exists()
    rerun = run_graft("train", "--params", str(params_path), cwd=ws)
    assert rerun.returncode == 0, rerun.stderr
    assert "epoch 1:" not in rerun.stdout and "epoch 2:" in rerun.stdout  # resumed after epoch 1, not restarted
    resumed = load_model(ws / "models")
    assert resumed["history"] == reference["history"]
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert not (checkpoints / "last.pt").exists()


def test_row14_sigkill_during_head_training_keeps_the_previous_model(tmp_path: Path) -> None:
    """Kill `graft train` (head) while model.pt is being published: the old model.pt is byte-identical, and the
    rerun writes the same model as an uninterrupted run."""
    ws = tmp_path / "ws"
    write_tree(ws / "raw", per_class=12)
    params = params_for(ws, {"train": {"max_epochs": 40}})
    ingest(params)
    featurize(params)
    train(params_for(ws, {"train": {"max_epochs": 40, "lr": 0.05}}))  # an older, different model
    old = (ws / "models/model.pt").read_bytes()
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    train(params_for(ref, {"train": {"max_epochs": 40}}))
    reference = load_model(ref / "models")
    params_path = write_params(ws, params)

    proc = start_graft("train", "--params", str(params_path), cwd=ws, slow=2.0)
    wait_until(lambda: any(p.name.startswith(".model.pt.") for p in tmp_files(ws / "models")), proc)
    _kill(proc)

    assert (ws / "models/model.pt").read_bytes() == old, output_of(proc)
    rerun = run_graft("train", "--params", str(params_path), cwd=ws)
    assert rerun.returncode == 0, rerun.stderr
    fresh = load_model(ws / "models")
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, fresh["state_dict"][k]), k
    assert fresh["history"] == reference["history"]
