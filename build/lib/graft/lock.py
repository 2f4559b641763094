"""Inter-process locks: one graft run per workspace, one featurize per feature cache.

Overlapping runs (two schedules, a schedule and a person, ``graft run`` beside ``dvc repro``) would
otherwise rewrite the same manifest, model and metrics under each other. Every stage command and
the pipeline flow hold the *workspace lock* (``<workspace>/.graft.lock``, the workspace being the
folder of the params file). By default a second run is refused at once with a one-line message
naming the holder; ``--wait SECONDS`` (or ``GRAFT_LOCK_WAIT``) makes it queue instead.

The feature cache is shared by many workspaces, so featurize also holds a *cache lock*
(``<cache_dir>/.graft-cache.lock``) and always waits for it: the second run then finds the first
one's features in the cache and computes nothing, instead of writing the same keys again.

The locks are ``flock`` locks: the kernel drops them when the holder exits or is killed, so a crash
never leaves a stale lock. They are re-entrant within one process (the flow calls stage code that
the CLI has already locked) and within a process tree: a child started while the lock is held sees
the holder in ``GRAFT_LOCK_HELD`` and does not wait for its own parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from graft import GraftError

try:  # POSIX; elsewhere the locks degrade to no-ops (graft is tested on Linux)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

WORKSPACE_LOCK = ".graft.lock"
CACHE_LOCK = ".graft-cache.lock"
ENV_HELD = "GRAFT_LOCK_HELD"  # JSON {lock path: holder pid}, inherited by child processes
ENV_WAIT = "GRAFT_LOCK_WAIT"  # default seconds to wait for the workspace lock
CACHE_WAIT_S = 6 * 3600.0  # featurize queues behind another featurize of the same cache (hours of images)
_POLL_S = 0.2  # how often a waiter retries: short next to any stage's run time

_held: dict[str, int] = {}  # lock path -> nesting depth in this process
_held_guard = threading.Lock()


def default_wait() -> float:
    """Seconds to wait for the workspace lock when ``--wait`` is not given (``GRAFT_LOCK_WAIT``, else 0)."""
    raw = os.environ.get(ENV_WAIT, "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise GraftError(f"{ENV_WAIT}={raw!r} is not a number of seconds") from None


def workspace_of(params_path: str | os.PathLike[str]) -> Path:
    """The workspace a params file belongs to: its folder (the project root for ``params.yaml``)."""
    return Path(params_path).resolve().parent


def holder(lock_file: str | os.PathLike[str]) -> dict | None:
    """What the lock file says about its current or last holder (pid, command, since), if readable."""
    try:
        info = json.loads(Path(lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} `{info.get('command', '?')}` on {info.get('host', '?')}, since {info.get('since', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _env_held() -> dict[str, int]:
    try:
        held = json.loads(os.environ.get(ENV_HELD, "{}"))
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _held_by_ancestor(key: str) -> bool:
    """True when a parent process holds ``key`` and told us so (and still does)."""
    pid = _env_held().get(key)
    if not isinstance(pid, int) or pid == os.getpid() or not _alive(pid):
        return False
    info = holder(key)
    return bool(info) and info.get("pid") == pid


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:200]


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _record(fd: int) -> None:
    """Write who holds the lock into the lock file (in place: the file itself is the lock)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())


@contextlib.contextmanager
def file_lock(lock_file: str | os.PathLike[str], wait_s: float, what: str, hint: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file``; wait up to ``wait_s`` seconds for another holder.

    Args:
        lock_file: the lock file (created if missing, never deleted: deleting flock files races).
        wait_s: seconds to wait; 0 refuses at once.
        what: what the lock protects, for messages ("workspace lock", "feature cache lock").
        hint: what the user can do when refused.

    Raises:
        GraftError: another process holds the lock and did not release it within ``wait_s``.
    """
    path = Path(lock_file).resolve()
    key = str(path)
    with _held_guard:
        if _held.get(key) or _held_by_ancestor(key):
            _held[key] = _held.get(key, 0) + 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # e.g. params.yaml on a read-only mount: run, but say that nothing guards it
        print(f"graft: warning: cannot create the {what} {path} ({exc.strerror}); running without it",
              file=sys.stderr, flush=True)
        yield
        return
    try:
        deadline, told = time.monotonic() + wait_s, False
        while not _try_lock(fd):
            info = _describe(holder(path))
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise GraftError(f"another graft run holds the {what} {path} ({info}){waited}: {hint}")
            if not told:
                print(f"graft: another graft run holds the {what} {path} ({info}); waiting up to {wait_s:g} s...",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(_POLL_S)
        _record(fd)
        with _held_guard:
            _held[key] = 1
        before = os.environ.get(ENV_HELD)
        os.environ[ENV_HELD] = json.dumps({**_env_held(), key: os.getpid()})
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)  # a child still carrying our pid in GRAFT_LOCK_HELD must not think we hold it
            if before is None:
                os.environ.pop(ENV_HELD, None)
            else:
                os.environ[ENV_HELD] = before
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def workspace_lock(params_path: str | os.PathLike[str], wait_s: float | None = None) -> contextlib.AbstractContextManager[None]:
    """The lock that serialises graft runs on the workspace of ``params_path``."""
    if not Path(params_path).is_file():  # loading the params will fail with the clear message; make no folders
        return contextlib.nullcontext()
    wait = default_wait() if wait_s is None else wait_s
    return file_lock(workspace_of(params_path) / WORKSPACE_LOCK, wait, "workspace lock",
                     f"wait for it to finish, or pass --wait SECONDS (or set {ENV_WAIT}) to queue behind it")


def cache_lock(cache_dir: str | os.PathLike[str], wait_s: float = CACHE_WAIT_S) -> contextlib.AbstractContextManager[None]:
    """The lock that serialises featurize runs filling one feature cache (waits by default)."""
    return file_lock(Path(cache_dir) / CACHE_LOCK, wait_s, "feature cache lock",
                     "another featurize is still filling this cache; rerun when it has finished")
