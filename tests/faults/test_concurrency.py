"""Fault rows 15 and 26: two runs writing one feature cache, and overlapping runs on one workspace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from graft import GraftError
from graft.cache import load_feature_table
from graft.cli import main
from graft.lock import ENV_HELD, WORKSPACE_LOCK, cache_lock, holder, workspace_lock
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from tests.faults.helpers import output_of, params_for, start_graft, tmp_files, wait_until, write_params
from tests.helpers import REPO, class_image, write_tree

pytestmark = pytest.mark.timeout(180)


def _part_keys(cache: Path) -> list[str]:
    return [
        k
        for p in sorted(cache.glob("*/part-*.parquet"))
        for k in pq.read_table(p, columns=["sha256"]).column(0).to_pylist()
    ]


def _workspace(root: Path, shared_cache: Path, own: range) -> Path:
    """A workspace with 2 x 12 shared images plus its own (seeds ``own``), ingested, featurizing into
    ``shared_cache``."""
    write_tree(root / "raw", per_class=12)
    for i in own:
        class_image(0, i).save(root / "raw/cat" / f"own-{i}.png")
    params = params_for(root, {"featurize": {"cache_dir": str(shared_cache), "batch_size": 4, "part_rows": 4}})
    ingest(params)
    return write_params(root, params)


@pytest.mark.slow
def test_two_featurize_processes_on_one_cache_store_every_key_once(tmp_path: Path) -> None:
    """Two `graft featurize` runs started together on one cache: they queue on the cache lock, the second
    computes only what the first did not, every key sits in the cache once, both tables read back whole."""
    cache = tmp_path / "shared-cache"
    pa_, pb = _workspace(tmp_path / "a", cache, range(600, 602)), _workspace(tmp_path / "b", cache, range(700, 703))

    with cache_lock(cache, wait_s=0):  # hold the gate until both processes are up and queued on it
        runs = [start_graft("featurize", "--json", "--params", str(p), cwd=p.parent) for p in (pa_, pb)]
        for run in runs:
            wait_until(lambda run=run: "waiting" in output_of(run), run)
    for run in runs:
        assert run.wait(timeout=120) == 0, output_of(run)

    assert all("another graft run holds the feature cache lock" in output_of(r) for r in runs)
    summaries = [json.loads(output_of(r).strip().splitlines()[-1])["featurize"] for r in runs]
    assert [s["images"] for s in summaries] == [26, 27]
    assert sum(s["computed"] for s in summaries) == 24 + 2 + 3  # the shared 24 were computed once
    assert sorted(s["computed"] for s in summaries) in ([2, 27], [3, 26])
    keys = _part_keys(cache)
    assert len(keys) == len(set(keys)) == 24 + 2 + 3
    fa, _ = load_feature_table(tmp_path / "a/data/features.parquet")
    fb, _ = load_feature_table(tmp_path / "b/data/features.parquet")
    assert len(fa) == 26 and len(fb) == 27
    for k in fa.keys() & fb.keys():
        assert np.array_equal(fa[k], fb[k])
    assert tmp_files(cache) == []


def test_unlocked_writers_racing_still_read_one_row_per_key(ws: Path) -> None:
    """Library callers that bypass the CLI's cache lock may both compute an image; readers still see it once."""
    write_tree(ws / "raw", per_class=10)
    # torch engine: torch.onnx.export is not thread-safe, so two threads may not both build the ORT engine
    params = params_for(ws, {"featurize": {"part_rows": 4, "batch_size": 4, "engine": "torch"}})
    ingest(params)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            featurize(params)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert errors == []
    feats, _ = load_feature_table(params.featurize.out)
    table = pq.read_table(params.featurize.out)
    assert table.num_rows == len(set(table["sha256"].to_pylist())) == 20 == len(feats)
    assert set(_part_keys(ws / "cache")) == set(feats)


_HOLDER = """
import sys, time
from graft.lock import workspace_lock
with workspace_lock(sys.argv[1], 0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(params_path: Path, seconds: float, env: dict | None = None) -> subprocess.Popen:
    """Another process holding the workspace lock for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(params_path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**(env or os.environ), "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("graft: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_overlapping_run_is_refused_naming_the_running_graft(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """While a real `graft featurize` runs, `graft train` on the same workspace is refused in one line naming it."""
    write_tree(ws / "raw", per_class=12)
    params = params_for(ws, {"featurize": {"part_rows": 4, "batch_size": 4}})
    ingest(params)
    path = write_params(ws, params)
    running = start_graft("featurize", "--params", str(path), cwd=ws, slow=0.4)
    wait_until(lambda: (holder(ws / WORKSPACE_LOCK) or {}).get("pid") == running.pid, running)

    rc = main(["train", "--params", str(path)])

    line = _one_error_line(capsys)
    assert rc == 2
    assert f"another graft run holds the workspace lock {ws / WORKSPACE_LOCK} (pid {running.pid} `slow_cli.py" in line
    assert "featurize" in line and "pass --wait SECONDS" in line
    assert not (ws / "models/model.pt").exists()
    assert running.wait(timeout=120) == 0, output_of(running)


def test_waiting_run_starts_when_the_other_finishes(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """With --wait the second run says it is waiting, then runs as soon as the lock is free."""
    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))
    other = _hold(path, 1.5)
    t0 = time.monotonic()

    rc = main(["ingest", "--params", str(path), "--wait", "60"])

    assert rc == 0 and other.wait(timeout=30) == 0
    assert time.monotonic() - t0 >= 1.0
    assert (
        f"another graft run holds the workspace lock {ws / WORKSPACE_LOCK} (pid {other.pid}" in capsys.readouterr().err
    )
    assert (ws / "data/manifest.parquet").is_file()


def test_wait_that_runs_out_is_a_clear_error(ws: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """GRAFT_LOCK_WAIT sets the default wait; when it runs out the message says how long it waited."""
    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))
    other = _hold(path, 10)
    monkeypatch.setenv("GRAFT_LOCK_WAIT", "0.5")
    try:
        rc = main(["ingest", "--params", str(path)])
    finally:
        other.kill()
    assert rc == 2 and "after waiting 0.5 s" in _one_error_line(capsys)


def test_prefect_flow_is_refused_while_the_workspace_is_locked(ws: Path) -> None:
    """The pipeline flow takes the same lock before any task runs."""
    from graft.flows.pipeline import pipeline

    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))
    other = _hold(path, 10)
    try:
        with pytest.raises(GraftError, match=f"holds the workspace lock .* \\(pid {other.pid} "):
            pipeline.fn(str(path))
    finally:
        other.kill()
    assert not (ws / "data").exists()


def test_killed_holder_leaves_no_stale_lock(ws: Path) -> None:
    """The kernel drops the lock with its holder: after a SIGKILL the next run proceeds at once."""
    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))
    other = _hold(path, 60)
    os.kill(other.pid, signal.SIGKILL)
    other.wait(timeout=30)

    assert main(["ingest", "--params", str(path)]) == 0


def test_lock_is_reentrant_in_process_and_for_children(ws: Path) -> None:
    """Nested locks in one process and a child started by the holder do not wait; an unrelated process does."""
    path = write_params(ws, params_for(ws))
    probe = (
        "import sys\nfrom graft.lock import workspace_lock\n"
        "try:\n    cm = workspace_lock(sys.argv[1], 0); cm.__enter__(); print('got')\n"
        "except Exception as e:\n    print('refused')\n"
    )
    with workspace_lock(path, 0):
        with workspace_lock(path, 0):  # the flow inside `graft run`
            pass
        child = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        stranger_env = {k: v for k, v in os.environ.items() if k != ENV_HELD}
        stranger = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            capture_output=True,
            text=True,
            env={**stranger_env, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
    assert child.stdout.strip() == "got", child.stderr
    assert stranger.stdout.strip() == "refused", stranger.stderr
    assert ENV_HELD not in os.environ
    with workspace_lock(path, 0):  # released: free again
        pass


def test_missing_params_file_makes_no_lock_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A mistyped --params fails on the params, and the lock does not create the folder it names."""
    missing = tmp_path / "typo" / "params.yaml"

    assert main(["ingest", "--params", str(missing)]) == 2

    assert "params file not found" in _one_error_line(capsys)
    assert not missing.parent.exists()


def test_unwritable_workspace_runs_with_a_warning(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """params.yaml on a read-only mount: the lock file cannot be made, the run goes ahead and says so."""
    write_tree(ws / "raw", per_class=6)
    path = write_params(ws, params_for(ws))
    real_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if Path(file).name == WORKSPACE_LOCK:
            raise PermissionError(13, "Read-only file system", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)

    assert main(["ingest", "--params", str(path)]) == 0

    assert (
        f"graft: warning: cannot create the workspace lock {ws / WORKSPACE_LOCK} (Read-only file system); "
        "running without it" in capsys.readouterr().err
    )
