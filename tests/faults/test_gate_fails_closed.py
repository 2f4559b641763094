"""The retrain gate fails closed: a champion that cannot be read, or a baseline revision that cannot be
found, stops the run instead of passing it; a revision is never handed to git as an option; and a
promotion cannot lose its history row."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from graft import GraftError
from graft.cli import main
from graft.params import RetrainParams
from graft.tasks.retrain import load_champion, promote
from tests.faults.helpers import params_for, write_params
from tests.helpers import write_tree


def _promoted(tmp_path: Path) -> tuple[RetrainParams, Path]:
    rp = RetrainParams(models_dir=str(tmp_path / "models"))
    src = tmp_path / "challenger"
    src.mkdir()
    (src / "model.pt").write_bytes(b"pt")
    (src / "model.onnx").write_bytes(b"onnx")
    rows = pd.DataFrame([("x.png", "h1", "a", "test")], columns=["path", "sha256", "label", "split"])
    return rp, promote(rp, src, src / "model.onnx", rows, ["a"], {"kind": "head"})


def test_a_dangling_champion_link_is_an_error_not_a_first_model(tmp_path: Path) -> None:
    """models/champion -> a version folder that is gone: the retrain stops (it used to promote ungated)."""
    rp, version = _promoted(tmp_path)
    shutil.rmtree(version)
    assert os.path.islink(tmp_path / "models/champion")

    with pytest.raises(GraftError) as info:
        load_champion(rp)

    msg = str(info.value)
    assert msg.startswith(f"champion {tmp_path / 'models/champion'} -> versions/{version.name} is not a version folder")
    assert msg.endswith(f"restore it, or remove {tmp_path / 'models/champion'} to start over without a champion")
    assert "\n" not in msg


def test_a_corrupt_champion_meta_is_one_line_naming_the_file(tmp_path: Path) -> None:
    rp, version = _promoted(tmp_path)
    (version / "meta.json").write_text('{"version": ', encoding="utf-8")

    with pytest.raises(GraftError, match=r"^champion .*/champion -> versions/\S+ is unreadable \(.*meta\.json: Exp"):
        load_champion(rp)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository whose first commit holds metrics/evaluation.json; the workspace's metrics are a bit better."""
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n", encoding="utf-8")
    (tmp_path / "metrics").mkdir()
    metrics = {"model": {"macro_f1": 0.80, "per_class": {"a": {"recall": 0.8, "support": 5}}}}
    (tmp_path / "metrics/evaluation.json").write_text(json.dumps(metrics), encoding="utf-8")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "base"]):
        subprocess.run(["git", *cmd], check=True, capture_output=True)
    metrics["model"]["macro_f1"] = 0.85
    (tmp_path / "metrics/evaluation.json").write_text(json.dumps(metrics), encoding="utf-8")
    return tmp_path


def _error(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and not captured.out, captured
    return lines[0]


def test_gate_against_a_missing_revision_fails_unless_a_first_run_is_allowed(repo: Path, capsys) -> None:
    assert main(["gate", "--against", "HEAD"]) == 0
    assert "gate: PASS: macro-F1 0.8500 vs champion 0.8000" in capsys.readouterr().out

    assert main(["gate", "--against", "no-such-rev"]) == 2
    assert _error(capsys).startswith("graft: error: no baseline metrics/evaluation.json at no-such-rev (")

    assert main(["gate", "--against", "no-such-rev", "--allow-missing"]) == 0
    assert "allowed by --allow-missing" in capsys.readouterr().out


def test_gate_outside_git_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above either
    (tmp_path / "params.yaml").write_text("seed: 0\n", encoding="utf-8")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluation.json").write_text('{"model": {"macro_f1": 0.9, "per_class": {}}}')

    assert main(["gate"]) == 2
    assert "not a git repository" in _error(capsys)


def test_a_revision_that_looks_like_an_option_never_reaches_git(repo: Path, capsys) -> None:
    """`--against=--output=FILE` used to make `git show` write FILE; now it is refused before git runs."""
    before = sorted(p.name for p in repo.iterdir())

    assert main(["gate", "--against=--output=pwned"]) == 2

    line = _error(capsys)
    assert line.startswith("graft: error: --against '--output=pwned' is not a plain git revision")
    assert sorted(p.name for p in repo.iterdir()) == before


RETRAIN = {
    "retrain": {"escalate_below_val_accuracy": None, "max_macro_f1_drop": 1.0, "max_class_recall_drop": 1.0},
    "export": {"quantize": None},
}


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no handler catches a BaseException it does not name)."""


def test_a_promotion_killed_before_its_history_row_gets_the_row_on_the_next_run(
    ws: Path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graft.flows.retrain as flow

    write_tree(ws / "raw", per_class=8)
    path = write_params(ws, params_for(ws, RETRAIN))

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(flow, "append_history", killed)  # the champion link is swapped, the row not written
    with pytest.raises(_Killed):
        flow.retrain(str(path))
    monkeypatch.undo()
    champion = os.readlink(ws / "models/champion")
    assert not (ws / "models/history.parquet").exists()

    second = flow.retrain(str(path))

    history = pd.read_parquet(ws / "models/history.parquet")
    assert second["decision"] == "unchanged"
    assert list(history["decision"]) == ["promoted", "unchanged"]
    assert history["champion"].iloc[0] == Path(champion).name == history["champion"].iloc[1]
    assert history["reason"].iloc[0].startswith("first model: no champion to beat (row restored")
