"""What a ``graft`` process spends on Python's cyclic garbage collector while it starts and ends.

Loading torch, timm and scikit-learn creates hundreds of thousands of objects and no garbage, yet the
collector runs a full scan each time the heap has grown by a quarter: 7 of them (0.9 s) in the first 6 s of a
224 px ``graft train``, none in its training loop. At interpreter exit it scans every object again while the
modules are torn down (1.3 s). :func:`loading` and :func:`exit_process` skip both: whole ``graft train`` runs
alternated with and without them are 3.4 s shorter on average (``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator
from typing import NoReturn

_command = [False]  # set by one_command (graft.cli.entry): this process is one `graft` command


def one_command() -> None:
    """Mark this process as a single ``graft`` command that ends when the command does: from now on what
    :func:`loading` imports stays out of the collector's scans for good (:func:`gc.freeze`), since it lives to
    the end anyway. Never set in a process that goes on (tests, a flow server): there a collection would still
    be owed to whatever was garbage at that moment."""
    _command[0] = True


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Pause the cyclic collector while modules load (imports make no garbage cycles to find); its previous
    state returns on exit. In a :func:`one_command` process, when modules were imported, every object alive at
    the end (the modules, a model just built) is frozen out of later scans."""
    was, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if _command[0] and len(sys.modules) > modules:
            gc.freeze()
        if was:
            gc.enable()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` after :func:`gc.freeze`, so the interpreter's exit skips its scans of every
    live object (atexit handlers, file flushing and module teardown still run)."""
    gc.freeze()
    sys.exit(code)
