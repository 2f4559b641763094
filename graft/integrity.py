"""Integrity checks on files graft reads back after writing them: a changed ONNX graph, a corrupt Parquet part.

Both used to pass silently or look like passing I/O trouble: a ``backbone.onnx`` whose weights were
changed gave features off by 0.37, and a corrupt data page in a cache part said "I/O error ... rerun
when the storage is back" (and Prefect retried it). Here they are named as what they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from graft import GraftError


def read_part(part: Path, columns: list[str] | None = None) -> pa.Table:
    """A cache part's rows; data that cannot be decoded is a GraftError naming the part, not an I/O error
    (which Prefect would retry as transient: an OSError from the storage keeps its errno and stays one)."""
    try:
        return pq.read_table(part, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraftError(f"feature cache part {part} is corrupt ({why}): delete it and rerun featurize") from None


WEIGHTS_KEY = "graft.graph_sha256"  # sha256 of the serialized graph (weights included), set at export


def graph_sha256(proto) -> str:
    """sha256 of an ONNX model's graph (nodes and weights; the metadata, which holds this hash, is outside it)."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def graph_verified(path: Path) -> bool:
    """True if ``path`` carries the hash of its graph and matches it; False if it carries none (an older
    export); a GraftError if the weights or nodes changed since export (a backbone silently off)."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any unloadable graph gets the same fix
        raise GraftError(f"cannot load {path} ({str(exc).splitlines()[0]}); delete it and rerun") from None
    recorded = {p.key: p.value for p in proto.metadata_props}.get(WEIGHTS_KEY)
    if recorded is not None and recorded != graph_sha256(proto):
        raise GraftError(f"{path} changed since it was exported (graph sha256 differs): delete it and rerun")
    return recorded is not None
