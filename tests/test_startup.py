"""graft.startup: the garbage collector is paused while modules load and restored after, frozen only in a process
that is one `graft` command, and the command's exit keeps its status and still runs the atexit handlers."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from graft.startup import loading


def test_loading_pauses_the_collector_and_restores_its_state() -> None:
    assert gc.isenabled()
    with loading():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ImportError), loading():
        import graft_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert gc.isenabled()  # restored after a failed import too
    gc.disable()
    try:
        with loading():
            pass
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def test_loading_leaves_nothing_frozen_outside_a_one_command_process() -> None:
    before = gc.get_freeze_count()
    with loading():
        import wave  # noqa: F401  # the stdlib's WAV module: not loaded by anything else here

    assert gc.get_freeze_count() == before


_CHILD = """
import gc, sys
from graft.startup import loading, one_command
if sys.argv[1] == "command":
    one_command()
with loading():
    pass
print("after nothing loaded", gc.get_freeze_count())
with loading():
    import wave
print("after a module loaded", gc.get_freeze_count())
print("enabled", gc.isenabled())
"""


@pytest.mark.parametrize("kind", ["command", "library"])
def test_a_one_command_process_freezes_what_it_loaded(kind: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    counts = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert counts["after nothing loaded"] == "0"  # no import: nothing to freeze
    assert counts["enabled"] == "True"
    if kind == "command":
        assert int(counts["after a module loaded"]) > 1000  # the interpreter's objects and wave's
    else:
        assert counts["after a module loaded"] == "0"


def test_exit_process_keeps_the_status_and_runs_atexit_handlers(tmp_path: Path) -> None:
    marker = tmp_path / "atexit.txt"
    code = (
        "import atexit, pathlib, sys\n"
        "from graft.startup import exit_process\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')\n"
        "sys.stdout.write('buffered, not flushed')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "buffered, not flushed"
    assert marker.read_text() == "ran"


def test_the_graft_command_exits_with_main_status(tmp_path: Path) -> None:
    """`python -m graft.cli` goes through entry(): a usage error is still status 2, a missing input too."""
    bad = subprocess.run(
        [sys.executable, "-m", "graft.cli", "no-such-command"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "graft.cli", "metrics", "--path", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("graft: error:")
