"""Atomic artifact writes: every file graft produces goes through here.

A write lands in a temporary file in the destination folder, is flushed and fsynced, then
``os.replace``d over the final path. A crash, a kill or a full disk leaves either the previous
file or the new one at the final path, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graft import GraftError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    final = Path(path)
    tmp_path: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # the writer may have closed its handle: fsync by reopening
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except OSError as exc:
        if tmp_path:
            tmp_path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GraftError(f"disk full while writing {final}; the previous file is untouched") from exc
        raise
    except BaseException:
        if tmp_path:
            tmp_path.unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_parquet(path: str | os.PathLike[str], table: Any) -> Path:
    """Write a pandas DataFrame or a pyarrow Table as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    return write_with(path, lambda tmp: pq.write_table(table, tmp))


def write_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` via memory: a full disk then fails as a plain OSError ("disk full"), not in torch's C++."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def write_csv(path: str | os.PathLike[str], frame: Any) -> Path:
    return write_with(path, lambda tmp: frame.to_csv(tmp, index=False))
