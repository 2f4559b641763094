"""The workspace lock guards the folder a run writes its outputs into, wherever its params file lies.

Outputs are written relative to the current folder, so two params files in two places, run from
one project folder, write the same ``models/``: they must exclude each other. (The lock used to
live beside the params file, so ``graft retrain`` and ``graft retrain --params /elsewhere/...``
both ran and both promoted against one champion.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from graft.cli import main
from graft.lock import ENV_HELD, WORKSPACE_LOCK, holder, workspace_lock
from graft.params import parse_params
from tests.helpers import REPO, write_tree

# Relative outputs (the defaults) and a relative data root: everything resolves against the current folder.
RELATIVE = "data: {root: raw}\n"

_HOLDER = """
import sys, time
from graft.lock import workspace_lock
with workspace_lock(sys.argv[1], 0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_two_params_files_run_from_one_folder_share_its_lock(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A run with ./params.yaml holds the lock; `graft ingest --params elsewhere/params.yaml` from the same folder
    is refused in one line naming the lock in the project folder, and writes nothing."""
    write_tree(ws / "raw", per_class=6)
    (ws / "params.yaml").write_text(RELATIVE, encoding="utf-8")
    other = ws / "elsewhere" / "params.yaml"
    other.parent.mkdir()
    other.write_text(RELATIVE, encoding="utf-8")
    monkeypatch.chdir(ws)
    env = {k: v for k, v in os.environ.items() if k != ENV_HELD}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, "params.yaml", "60"],
        cwd=ws,
        stdout=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(ws / WORKSPACE_LOCK)["pid"] == proc.pid

        rc = main(["ingest", "--params", str(other)])
    finally:
        proc.kill()
        proc.wait(timeout=30)

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"graft: error: another graft run holds the workspace lock {ws / WORKSPACE_LOCK} (pid ")
    assert not (ws / "data").exists() and not (other.parent / WORKSPACE_LOCK).exists()


def test_the_lock_follows_the_outputs_not_the_params_file(tmp_path: Path) -> None:
    """One folder holding every output: its lock. Outputs spread over unrelated trees: one lock per output folder."""
    from graft.lock import workspace_of

    project = parse_params(
        {
            "data": {"out_dir": str(tmp_path / "p/data")},
            "featurize": {"out": str(tmp_path / "p/data/features.parquet")},
            "train": {"model_dir": str(tmp_path / "p/models")},
            "evaluate": {
                "metrics_dir": str(tmp_path / "p/metrics"),
                "plots_dir": str(tmp_path / "p/plots"),
                "report": str(tmp_path / "p/reports/report.md"),
            },
            "export": {"out": str(tmp_path / "p/models/model.onnx")},
            "retrain": {"models_dir": str(tmp_path / "p/models"), "history": str(tmp_path / "p/models/h.parquet")},
        }
    )
    assert workspace_of(project) == [tmp_path / "p"]

    spread = project.model_copy(update={"train": project.train.model_copy(update={"model_dir": "/srv/graft-models"})})
    p = tmp_path / "p"
    assert workspace_of(spread) == [
        Path("/srv/graft-models"),
        p / "data",
        p / "metrics",
        p / "models",
        p / "plots",
        p / "reports",
    ]

    with workspace_lock(project, 0):
        assert holder(tmp_path / "p" / WORKSPACE_LOCK)["pid"] == os.getpid()
