"""Inter-process locks: one graft run per workspace, one featurize per feature cache.

Overlapping runs (two schedules, a schedule and a person, ``graft run`` beside ``dvc repro``) would
otherwise rewrite the same manifest, model and metrics under each other. Every stage command and
the pipeline and retrain flows hold the *workspace lock* (``<workspace>/.graft.lock``). The
workspace is where the run's outputs go, not where its params file lies: the deepest folder
holding every output path of the params (data.out_dir, featurize.out, train.model_dir, the evaluate
folders, export.out, retrain.models_dir and history), relative paths resolved against the current
folder as the stages write them. So ``graft retrain`` and ``graft retrain --params
/elsewhere/params.yaml`` run from one project folder share one lock. Outputs spread over unrelated
trees (no common folder but ``/``) are each locked in their own folder instead. By default a second
run is refused at once with a one-line message naming the holder; ``--wait SECONDS`` (or
``GRAFT_LOCK_WAIT``) makes it queue instead.

The feature cache is shared by many workspaces, so featurize also holds a *cache lock*
(``<cache_dir>/.graft-cache.lock``) and always waits for it: the second run then finds the first
one's features in the cache and computes nothing, instead of writing the same keys again.

The locking itself is ``filelock``'s; this module adds the holder note in the lock file, the
one-line refusal, and re-entrancy within a process tree: a child started while the lock is held
(``graft run`` -> ``dvc repro`` -> ``graft train``) sees the holder in ``GRAFT_LOCK_HELD`` and does
not wait for its own parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from graft import GraftError
from graft.params import Params, load_params

WORKSPACE_LOCK = ".graft.lock"
CACHE_LOCK = ".graft-cache.lock"
ENV_HELD = "GRAFT_LOCK_HELD"  # JSON {lock path: holder pid}, inherited by child processes
ENV_WAIT = "GRAFT_LOCK_WAIT"  # default seconds to wait for the workspace lock
CACHE_WAIT_S = 6 * 3600.0  # featurize queues behind another featurize of the same cache (hours of images)
_POLL_S = 0.2  # how often a waiter retries: short next to any stage's run time

# Threads of one process share each lock; this makes "the last hold clears the note" atomic with its release.
_guard = threading.Lock()


def default_wait() -> float:
    """Seconds to wait for the workspace lock when ``--wait`` is not given (``GRAFT_LOCK_WAIT``, else 0)."""
    raw = os.environ.get(ENV_WAIT, "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise GraftError(f"{ENV_WAIT}={raw!r} is not a number of seconds") from None


def output_folders(params: Params) -> list[Path]:
    """Every folder a run with ``params`` writes into (the shared feature cache has its own lock), absolute."""
    d, e = params.data, params.evaluate
    files = (params.featurize.out, e.report, params.export.out, params.retrain.history)
    folders = [d.out_dir, params.train.model_dir, e.metrics_dir, e.plots_dir, params.retrain.models_dir]
    return sorted({Path(os.path.abspath(f)) for f in folders} | {Path(os.path.abspath(f)).parent for f in files})


def workspace_of(params: str | os.PathLike[str] | Params) -> list[Path]:
    """The folders whose lock guards a run with ``params`` (a params file or object): the deepest folder
    holding all its outputs, or each output folder when they share none but the filesystem root."""
    if not isinstance(params, Params):
        params = load_params(params)
    folders = output_folders(params)
    root = Path(os.path.commonpath(folders))
    if root != Path(root.anchor):
        return [root]
    return [f for f in folders if not any(f != o and f.is_relative_to(o) for o in folders)]


def holder(lock_file: str | os.PathLike[str]) -> dict | None:
    """What the lock file says about its current or last holder (pid, host, command, since), if readable."""
    try:
        info = json.loads(Path(lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "holder unknown"
    return (
        f"pid {info.get('pid')} `{info.get('command', '?')}` on {info.get('host', '?')}, since {info.get('since', '?')}"
    )


def _env_held() -> dict[str, int]:
    try:
        held = json.loads(os.environ.get(ENV_HELD, "{}"))
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _export(key: str, pid: int | None) -> None:
    """Tell child processes that ``pid`` holds ``key`` (``None``: that nobody here does any more)."""
    held = {k: v for k, v in _env_held().items() if k != key}
    if pid is not None:
        held[key] = pid
    if held:
        os.environ[ENV_HELD] = json.dumps(held)
    else:
        os.environ.pop(ENV_HELD, None)


def _record(fd: int) -> None:
    """Write who holds the lock into the lock file: filelock's ``on_acquired`` hook, run while we hold it."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(argv)[:200],
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _acquire(lock: FileLock, path: Path, wait_s: float, what: str, hint: str) -> bool:
    """Take ``lock``, waiting up to ``wait_s``; False when a parent process holds it for us.

    Raises:
        GraftError: someone else holds it and did not release it within ``wait_s``.
    """
    try:
        lock.acquire(blocking=False)  # nested holds in this process succeed here: the instance counts them
        return True
    except Timeout:
        info = holder(path)
    parent = _env_held().get(str(path))
    if info and parent is not None and info.get("pid") == parent and info.get("host") == socket.gethostname():
        return False  # our parent holds it (`graft run` -> `dvc repro` -> `graft train`): waiting would deadlock
    if wait_s > 0:
        print(
            f"graft: another graft run holds the {what} {path} ({_describe(info)}); waiting up to {wait_s:g} s...",
            file=sys.stderr,
            flush=True,
        )
        try:
            lock.acquire(timeout=wait_s, poll_interval=_POLL_S)
            return True
        except Timeout:
            info = holder(path)
    waited = f" after waiting {wait_s:g} s" if wait_s else ""
    raise GraftError(f"another graft run holds the {what} {path} ({_describe(info)}){waited}: {hint}")


@contextlib.contextmanager
def file_lock(lock_file: str | os.PathLike[str], wait_s: float, what: str, hint: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file``; wait up to ``wait_s`` seconds for another holder.

    Args:
        lock_file: the lock file (created if missing, never deleted: waiters must share one inode).
        wait_s: seconds to wait; 0 refuses at once.
        what: what the lock protects, for messages ("workspace lock", "feature cache lock").
        hint: what the user can do when refused.

    Raises:
        GraftError: another process holds the lock and did not release it within ``wait_s``.
    """
    path = Path(lock_file).resolve()
    key = str(path)
    # FileLock (flock), not SoftFileLock: the kernel drops a flock when its holder exits or is SIGKILLed, so a
    # crash never leaves a stale lock, where a soft lock's marker file would stay until someone deletes it.
    # One shared instance per path (singleton, not thread-local): a nested hold anywhere in this process (the
    # flow inside `graft run`, a task thread) counts up instead of waiting for itself.
    lock = FileLock(path, thread_local=False, is_singleton=True, on_acquired=_record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        taken = _acquire(lock, path, wait_s, what, hint)
    except OSError as exc:  # e.g. params.yaml on a read-only mount: run, but say that nothing guards it
        print(
            f"graft: warning: cannot create the {what} {path} ({exc.strerror}); running without it",
            file=sys.stderr,
            flush=True,
        )
        taken = False
    if not taken:
        yield
        return
    with _guard:
        _export(key, os.getpid())
    try:
        yield
    finally:
        with _guard:
            if lock.lock_counter == 1:  # the last hold here: the note names live holders only, so that a
                # child still carrying our pid in GRAFT_LOCK_HELD never takes a later holder for us
                with contextlib.suppress(OSError):
                    os.truncate(path, 0)
                _export(key, None)
            lock.release()


@contextlib.contextmanager
def workspace_lock(params: str | os.PathLike[str] | Params, wait_s: float | None = None) -> Iterator[None]:
    """The lock that serialises graft runs writing the outputs of ``params`` (a params file or object).

    Raises:
        GraftError: another run holds it past ``wait_s``, or the params file is invalid.
    """
    if not isinstance(params, Params) and not Path(params).is_file():  # loading fails later with the clear
        yield  # message; make no folders
        return
    wait = default_wait() if wait_s is None else wait_s
    hint = f"wait for it to finish, or pass --wait SECONDS (or set {ENV_WAIT}) to queue behind it"
    with contextlib.ExitStack() as stack:
        for folder in workspace_of(params):  # sorted: two runs never wait for each other crosswise
            stack.enter_context(file_lock(folder / WORKSPACE_LOCK, wait, "workspace lock", hint))
        yield


def cache_lock(
    cache_dir: str | os.PathLike[str], wait_s: float = CACHE_WAIT_S
) -> contextlib.AbstractContextManager[None]:
    """The lock that serialises featurize runs filling one feature cache (waits by default)."""
    return file_lock(
        Path(cache_dir) / CACHE_LOCK,
        wait_s,
        "feature cache lock",
        "another featurize is still filling this cache; rerun when it has finished",
    )
