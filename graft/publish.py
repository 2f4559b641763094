"""Publish a set of files that must change together, at fixed paths (export: the models and their report).

:mod:`graft.atomic` replaces one file atomically; several files cannot be swapped in one step. So a
set goes through a small journal:

1. each new file is written to a temporary file beside its final path and fsynced;
2. a journal listing the renames (and removals) is written atomically: the commit point;
3. the renames and removals run, then the journal is deleted.

A run killed before step 2 leaves the previous set untouched (its temporary files are removed by
the next run); a run killed after it leaves the journal, and the next run completes the renames
before anything else. Either way the set is the old one or the new one as a whole.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from graft import GraftError
from graft.atomic import temp_beside, write_json


def journal_of(first: Path) -> Path:
    """The journal of the set whose first file is ``first``: ``.<name>.publish.json`` beside it."""
    return first.with_name(f".{first.name}.publish.json")


def _finish(journal: Path) -> None:
    """Carry out a committed journal (idempotent: a rename already done is skipped), then delete it."""
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
        renames, removals = plan["replace"], plan["remove"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GraftError(f"unreadable publish journal {journal} ({exc}): delete it and rerun") from None
    base = journal.parent
    for tmp, final in renames:
        if (base / tmp).exists():
            os.replace(base / tmp, base / final)
    for gone in removals:
        (base / gone).unlink(missing_ok=True)
    journal.unlink()


def recover(finals: Sequence[Path]) -> bool:
    """Bring the set ``finals`` back to a whole state after a killed run; True if a journal was completed.

    A committed journal is carried out; any other leftover ``.<name>.*.tmp`` of the set is removed.
    """
    journal = journal_of(finals[0])
    done = journal.is_file()
    if done:
        _finish(journal)
    for final in [*finals, journal]:
        for left in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
            left.unlink(missing_ok=True)
    return done


@contextlib.contextmanager
def publish_together(write: Sequence[Path], remove: Sequence[Path] = ()) -> Iterator[dict[Path, Path]]:
    """Yield ``{final path: temporary path}`` for ``write``; if the block succeeds, publish them and
    delete ``remove`` as one step. If it fails, nothing changes. The caller holds the workspace lock."""
    finals = [Path(p) for p in write]
    journal = journal_of(finals[0])
    recover([*finals, *map(Path, remove)])
    tmps: dict[Path, Path] = {}
    try:
        for final in finals:
            tmps[final] = temp_beside(final)
        yield tmps
        for tmp in tmps.values():  # the writers may have closed their handles: fsync by reopening
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        rel = lambda p: os.path.relpath(p, journal.parent)  # noqa: E731 - the journal survives a moved workspace
        write_json(journal, {"replace": [[rel(t), rel(f)] for f, t in tmps.items()], "remove": list(map(rel, remove))})
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    _finish(journal)
