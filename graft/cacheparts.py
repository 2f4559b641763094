"""Writing the feature cache's Parquet parts, and checking parts and whole caches.

Featurize runners (the local engine loop and the Dask shards) buffer rows with :class:`PartWriter`,
which writes each part atomically under a unique name; :func:`holds_exactly` tells a shard whether an
earlier attempt already finished its part; :func:`compare_caches` checks that two runners (or two
runs) filled a cache alike. The layout and the readers are in :mod:`graft.cache`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graft import GraftError
from graft.atomic import write_parquet
from graft.cache import feature_table


def holds_exactly(part: Path, keys: Iterable[str]) -> bool:
    """True when ``part`` exists and its rows are exactly ``keys`` (a finished earlier attempt)."""
    if not part.is_file():
        return False
    try:
        found = pq.read_table(part, columns=["sha256"]).column(0).to_pylist()
    except (pa.ArrowException, OSError):  # unreadable: recompute and replace it
        return False
    return sorted(found) == sorted(keys)


class PartWriter:
    """Buffer feature rows and write them to the cache as atomic Parquet parts of about ``part_rows`` rows."""

    def __init__(self, cache: Path, dim: int, part_rows: int):
        self.cache, self.dim, self.part_rows = cache, dim, part_rows
        self.shas: list[str] = []
        self.feats: list[np.ndarray] = []
        self.written = 0

    def add(self, shas: list[str], feats: np.ndarray) -> None:
        if feats.shape != (len(shas), self.dim):
            raise GraftError(f"engine returned features of shape {feats.shape}, expected ({len(shas)}, {self.dim})")
        self.shas.extend(shas)
        self.feats.append(np.asarray(feats, np.float32))
        if len(self.shas) >= self.part_rows:
            self.flush()

    def flush(self, path: Path | None = None) -> None:
        """Write the buffered rows as one part (a fresh unique name unless ``path`` is given)."""
        if not self.shas:
            return
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet(path or self.cache / name, feature_table(self.shas, self.feats, self.dim))
        self.written += len(self.shas)
        self.shas, self.feats = [], []


def compare_caches(a: str | Path, b: str | Path) -> dict:
    """Keys, repeated rows and the largest absolute feature difference between two cache folders
    (checks that two runners, or two runs, filled a cache alike)."""

    def rows(cache: str | Path) -> tuple[dict[str, np.ndarray], int]:
        out: dict[str, np.ndarray] = {}
        repeats = 0
        for p in sorted(Path(cache).glob("part-*.parquet")):
            t = pq.read_table(p)
            feats = t["feature"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
            for k, v in zip(t["sha256"].to_pylist(), feats, strict=True):
                repeats += k in out
                out[k] = v
        return out, repeats

    (ra, dup_a), (rb, dup_b) = rows(a), rows(b)
    same = ra.keys() == rb.keys()
    diff = max((float(np.abs(ra[k] - rb[k]).max()) for k in ra), default=0.0) if same else float("inf")
    return {
        "rows_a": len(ra),
        "rows_b": len(rb),
        "repeated_a": dup_a,
        "repeated_b": dup_b,
        "same_keys": same,
        "max_abs_diff": diff,
    }
