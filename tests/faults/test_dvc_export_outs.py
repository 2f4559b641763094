"""``export.quantize: null`` (as documented) works under ``dvc repro``: the int8 model is a side artifact,
not a declared out, so DVC never fails the stage for a file that params say not to write.

A real ``dvc repro -s export`` in a copy of the repository with the tiny backbone (ingest, featurize
and train run in-process first, so DVC runs only the export stage: one graft process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graft.params import dump_params, load_params, parse_params
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.helpers import REPO, write_tree

pytestmark = pytest.mark.timeout(300)

RELATIVE_TINY = {  # every path relative, as in the repository's params.yaml
    "featurize": {"backbone": "tiny_cnn", "taps": ["last"], "threads": 1, "workers": 1},
    "train": {"mode": "head", "max_epochs": 20},
    "export": {"quantize": None},
}


def _repo_copy(dst: Path) -> None:
    """dvc.yaml and the code its stages list (graft/tasks and graft/flows stay symlinks)."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("graft", "tasks", "flows"):
        shutil.copytree(REPO / folder, dst / folder, symlinks=True, ignore=ignore)
    shutil.copy2(REPO / "dvc.yaml", dst / "dvc.yaml")


def test_dvc_repro_of_export_with_quantize_null_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _repo_copy(repo)
    (repo / "params.yaml").write_text(dump_params(parse_params(RELATIVE_TINY)), encoding="utf-8")
    write_tree(repo / "data/raw", per_class=10)
    monkeypatch.chdir(repo)
    params = load_params("params.yaml")
    for stage in (ingest, featurize, train):
        stage(params)
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["export"]["outs"]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),  # the copy's graft, not an installed one
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, env=env, check=True, capture_output=True)

    proc = subprocess.run(
        ["dvc", "repro", "-s", "export"], cwd=repo, env=env, capture_output=True, text=True, timeout=240
    )

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (repo / "models/model.onnx").is_file() and not (repo / "models/model.int8.onnx").exists()
    assert "models/model.int8.onnx" not in {o if isinstance(o, str) else next(iter(o)) for o in declared}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["export"]
    assert {o["path"] for o in lock["outs"]} == {"models/model.onnx", "metrics/export.json"}
