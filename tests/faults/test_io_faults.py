"""Fault rows 24 and 25: a full disk while writing, and transient I/O errors."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest

import graft.atomic
from graft import GraftError
from graft.atomic import atomic_path, write_csv, write_json, write_parquet, write_text, write_with
from graft.cli import main
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from graft.tasks.train_head import train
from tests.faults.helpers import params_for, tmp_files, write_params
from tests.helpers import write_tree

# --- row 24: disk full ---------------------------------------------------------------------------


@pytest.fixture
def dev_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every graft.atomic temp file a link to /dev/full: each write then fails with a real ENOSPC."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(os.devnull, os.O_RDONLY), name

    monkeypatch.setattr(graft.atomic.tempfile, "mkstemp", mkstemp)


def _savefig(tmp: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp, format="png")
    plt.close(fig)


def _onnx(tmp: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp))


WRITERS = {
    "parquet": lambda p: write_parquet(p, pd.DataFrame({"a": range(50_000)})),
    "csv": lambda p: write_csv(p, pd.DataFrame({"a": range(50_000)})),
    "json": lambda p: write_json(p, {"a": list(range(50_000))}),
    "text": lambda p: write_text(p, "x" * 100_000),
    "png (savefig)": lambda p: write_with(p, _savefig),
    "onnx.save": lambda p: write_with(p, _onnx),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_disk_full_while_writing_is_a_clear_error_and_keeps_the_previous_file(tmp_path: Path, dev_full, kind) -> None:
    """A real ENOSPC from the kernel, for every kind of artifact writer: a one-line error, the old file intact."""
    path = tmp_path / "out" / "artifact.bin"
    path.parent.mkdir()
    path.write_bytes(b"previous version")

    with pytest.raises(GraftError, match=rf"^disk full while writing {path}; the previous file is untouched$"):
        WRITERS[kind](path)

    assert path.read_bytes() == b"previous version"
    assert sorted(p.name for p in path.parent.iterdir()) == ["artifact.bin"]  # the temp link is gone too


@pytest.fixture
def trained(ws: Path):
    write_tree(ws / "raw", per_class=10)
    params = params_for(ws, {"train": {"max_epochs": 20}})
    ingest(params)
    featurize(params)
    train(params)
    return ws, params, write_params(ws, params)


def _enospc_on_replace(monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
    """os.replace into ``under`` fails as on a full disk (the last step of every atomic write)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(under.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(graft.atomic.os, "replace", replace)


@pytest.mark.parametrize(
    ("stage", "folder", "final"),
    [
        ("ingest", "data", "manifest.parquet"),
        ("train", "models", "model.pt"),
        ("featurize", "data", "features.parquet"),
    ],
)
def test_disk_full_during_a_stage_exits_2_and_keeps_previous_outputs(
    trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, stage: str, folder: str, final: str
) -> None:
    """`graft <stage>` on a full disk: exit 2, one line naming the file, every earlier output byte-identical."""
    ws, params, path = trained
    before = {p: p.read_bytes() for p in ws.rglob("*") if p.is_file() and "cache" not in p.parts}
    _enospc_on_replace(monkeypatch, ws / folder)

    rc = main([stage, "--params", str(path)])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("graft: error: disk full while writing ") and err[0].endswith(
        "the previous file is untouched"
    )
    assert {p: p.read_bytes() for p in before} == before
    assert (ws / folder / final).read_bytes() == before[ws / folder / final]
    assert tmp_files(ws) == []


def test_disk_full_outside_an_atomic_write_is_still_one_line(ws: Path, monkeypatch, capsys) -> None:
    """ENOSPC before the write starts (creating the temp file) is one line naming the file, not a traceback."""
    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))

    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), kwargs.get("dir"))

    monkeypatch.setattr(graft.atomic.tempfile, "mkstemp", mkstemp)

    rc = main(["ingest", "--params", str(path)])

    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err == [
        f"graft: error: disk full while writing {ws / 'data/manifest.parquet'}; the previous file is untouched"
    ]


def test_atomic_path_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A writer that dies half way leaves the old file and no temp file."""
    path = tmp_path / "a.txt"
    path.write_text("old")

    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed midway")

    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# --- row 25: transient I/O errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (OSError(errno.EIO, "Input/output error"), True),
        (TimeoutError("share timed out"), True),
        (ConnectionResetError(), True),
        (GraftError("bad params"), False),
        (ValueError("bad value"), False),
    ],
)
def test_transient_io_errors_are_retried_and_bad_inputs_are_not(exc: BaseException, retry: bool) -> None:
    """The stage tasks' retry condition: OS-level I/O errors retry, expected failures (GraftError) do not."""
    from prefect.states import Failed

    from graft.tasks import retry_transient as _transient

    assert _transient(None, None, Failed(data=exc)) is retry


def test_every_stage_task_retries_with_backoff() -> None:
    """All stage tasks (those the flows call) carry the retry policy: 2 retries after 2 s and 10 s."""
    from graft.tasks import retry_transient as _transient
    from graft.tasks.evaluate import evaluate_task
    from graft.tasks.export import export_task
    from graft.tasks.featurize import featurize_task
    from graft.tasks.finetune import finetune_task
    from graft.tasks.ingest import ingest_task
    from graft.tasks.train_head import train_task

    for t in (ingest_task, featurize_task, train_task, finetune_task, evaluate_task, export_task):
        assert (t.retries, t.retry_delay_seconds, t.retry_condition_fn) == (2, [2, 10], _transient), t.name


@pytest.mark.prefect
def test_prefect_retries_a_transient_error_and_not_a_graft_error(prefect_harness) -> None:
    """In a real flow run, an OSError is retried until it passes; a GraftError fails at once."""
    from prefect import flow

    from graft.tasks import stage_task

    calls: list[str] = []

    def flaky(kind: str) -> str:
        calls.append(kind)
        if kind == "io" and calls.count("io") < 3:
            raise OSError(errno.EIO, "Input/output error")
        if kind == "bad":
            raise GraftError("bad input")
        return "ok"

    task = stage_task(flaky, "flaky").with_options(retry_delay_seconds=0)

    @flow
    def run(kind: str) -> str:
        return task(kind)

    assert run("io") == "ok" and calls.count("io") == 3  # two retries
    with pytest.raises(GraftError, match="bad input"):
        run("bad")
    assert calls.count("bad") == 1
