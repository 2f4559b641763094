"""Tests for graft.lock: the holder note and refusal line, queueing, re-entrancy in a process tree, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from graft import GraftError
from graft.lock import CACHE_LOCK, ENV_HELD, WORKSPACE_LOCK, cache_lock, holder, workspace_lock
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(120)

# Holds the workspace lock of argv[1] for argv[2] seconds; its command line ends in "hold-marker".
_HOLDER = """
import sys, time
from graft.lock import workspace_lock
with workspace_lock(sys.argv[1], 0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""
# Tries the workspace lock of argv[1] without waiting: prints "got" and whom the note names meanwhile
# ("self" when this process took the lock), or "refused" and the message.
_PROBE = """
import os, sys
from pathlib import Path
from graft import GraftError
from graft.lock import WORKSPACE_LOCK, holder, workspace_lock
try:
    with workspace_lock(sys.argv[1], 0):
        pid = (holder(Path(sys.argv[1]).parent / WORKSPACE_LOCK) or {}).get("pid")
        print("got", "self" if pid == os.getpid() else pid)
except GraftError as e:
    print("refused", e)
"""


def _env(held: bool) -> dict[str, str]:
    """This checkout importable; without ``held`` an unrelated process (no GRAFT_LOCK_HELD inherited)."""
    env = dict(os.environ) if held else {k: v for k, v in os.environ.items() if k != ENV_HELD}
    return {**env, "PYTHONPATH": str(REPO)}


def _hold(params: Path, seconds: float) -> subprocess.Popen:
    """An unrelated process holding the workspace lock of ``params``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(params), str(seconds), "hold-marker"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(held=False),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _probe(params: Path, held: bool) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(params)], capture_output=True, text=True, env=_env(held), timeout=60
    )
    return out.stdout.strip() or out.stderr


@pytest.fixture
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\n", encoding="utf-8")  # default outputs: relative, so they land in the current folder
    monkeypatch.chdir(tmp_path)  # ... which is the workspace the lock guards (children inherit it)
    return path


def test_refusal_is_one_line_naming_the_holder(params: Path) -> None:
    """A second run is refused at once, in one line giving the holder's pid, command, host and start time."""
    other = _hold(params, 30)
    try:
        note = holder(params.parent / WORKSPACE_LOCK)
        t0 = time.monotonic()
        with pytest.raises(GraftError) as refused, workspace_lock(params, 0):
            pass
        elapsed = time.monotonic() - t0
    finally:
        other.kill()
        other.wait(timeout=30)
    message = str(refused.value)
    assert note["pid"] == other.pid and note["host"] == socket.gethostname() and "hold-marker" in note["command"]
    assert "\n" not in message and elapsed < 5
    assert message.startswith(
        f"another graft run holds the workspace lock {params.parent / WORKSPACE_LOCK} "
        f"(pid {other.pid} `{note['command']}` on {note['host']}, since {note['since']}): "
    )
    assert "pass --wait SECONDS" in message and "after waiting" not in message


def test_wait_queues_until_the_holder_releases(params: Path, capsys: pytest.CaptureFixture) -> None:
    """With a wait the second run says it is waiting, then gets the lock as soon as the first releases it."""
    other = _hold(params, 1.0)
    t0 = time.monotonic()
    with workspace_lock(params, 60):
        waited = time.monotonic() - t0
        assert holder(params.parent / WORKSPACE_LOCK)["pid"] == os.getpid()
        assert json.loads(os.environ[ENV_HELD]) == {str(params.parent / WORKSPACE_LOCK): os.getpid()}
    err = capsys.readouterr().err
    assert 0.5 <= waited < 30 and other.wait(timeout=30) == 0
    assert (
        f"graft: another graft run holds the workspace lock {params.parent / WORKSPACE_LOCK} (pid {other.pid} `" in err
    )
    assert "waiting up to 60 s..." in err
    assert holder(params.parent / WORKSPACE_LOCK) is None  # released: the note is cleared
    assert ENV_HELD not in os.environ


def test_wait_that_runs_out_says_how_long(tmp_path: Path) -> None:
    """The cache lock (featurize) refused after its wait runs out names the wait."""
    with cache_lock(tmp_path / "cache", wait_s=0):  # creates the cache folder for its lock file
        assert (tmp_path / "cache" / CACHE_LOCK).is_file()
        code = (
            "import sys\nfrom graft.lock import cache_lock\n"
            "try:\n    cache_lock(sys.argv[1], 0.3).__enter__()\nexcept Exception as e:\n    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            env=_env(held=False),
            timeout=60,
        ).stdout
    assert f"holds the feature cache lock {tmp_path / 'cache' / CACHE_LOCK} (pid {os.getpid()} " in out
    assert "after waiting 0.3 s: another featurize is still filling this cache" in out


def test_child_of_the_holder_does_not_wait_for_it(params: Path) -> None:
    """A process started by the holder (dvc repro running graft train) goes ahead; an unrelated one is refused."""
    with workspace_lock(params, 0):
        child = _probe(params, held=True)
        stranger = _probe(params, held=False)
        assert holder(params.parent / WORKSPACE_LOCK)["pid"] == os.getpid()  # the child left our note alone
    assert child == f"got {os.getpid()}"
    assert (
        stranger.startswith("refused another graft run holds the workspace lock") and f"pid {os.getpid()} " in stranger
    )
    assert _probe(params, held=False) == "got self"  # released: free for anyone


def test_inherited_env_alone_does_not_let_a_process_in(params: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRAFT_LOCK_HELD naming a process that does not hold the lock (any more) is no pass: the note must agree."""
    key = str(params.parent / WORKSPACE_LOCK)
    other = _hold(params, 30)
    try:
        monkeypatch.setenv(ENV_HELD, json.dumps({key: os.getppid()}))  # alive, but not the holder
        with pytest.raises(GraftError, match=f"pid {other.pid} "), workspace_lock(params, 0):
            pass
        monkeypatch.setenv(ENV_HELD, json.dumps({key: other.pid}))  # as if we were its child
        with workspace_lock(params, 0):
            assert holder(key)["pid"] == other.pid
    finally:
        other.kill()
        other.wait(timeout=30)


def test_killed_holder_does_not_block_the_next_run(params: Path) -> None:
    """SIGKILL leaves the holder's note behind but no lock: the next run gets it at once and rewrites the note."""
    other = _hold(params, 60)
    os.kill(other.pid, signal.SIGKILL)
    other.wait(timeout=30)
    assert holder(params.parent / WORKSPACE_LOCK)["pid"] == other.pid  # the dead holder's note is still there

    t0 = time.monotonic()
    with workspace_lock(params, 0):
        assert holder(params.parent / WORKSPACE_LOCK)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5


def test_nested_holds_in_one_process_share_the_lock_across_threads(params: Path) -> None:
    """The flow inside `graft run`, or a task thread, re-takes the lock without waiting; it stays taken until the
    last of them lets go, whichever thread that is."""
    inside, leave = threading.Event(), threading.Event()

    def task() -> None:
        with workspace_lock(params, 0):
            inside.set()
            leave.wait(timeout=30)

    thread = threading.Thread(target=task)
    with workspace_lock(params, 0):
        with workspace_lock(params, 0):
            pass
        thread.start()
        assert inside.wait(timeout=30)
    assert _probe(params, held=False).startswith("refused")  # the task thread still holds it
    assert holder(params.parent / WORKSPACE_LOCK)["pid"] == os.getpid()
    leave.set()
    thread.join(timeout=30)
    assert _probe(params, held=False) == "got self"  # the last release freed it
    assert ENV_HELD not in os.environ
