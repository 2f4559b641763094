"""The feature cache: its on-disk format, reading, and the plan of what a run must compute.

Layout (shared by all runs and all checkouts that point at the same ``featurize.cache_dir``)::

    <cache_dir>/<backbone>-<fingerprint>/meta.json        what the fingerprint stands for
    <cache_dir>/<backbone>-<fingerprint>/backbone.onnx    the checked ONNX export (onnxruntime engine)
    <cache_dir>/<backbone>-<fingerprint>/part-*.parquet   sha256: string, feature: float32[d]

Rows are keyed by the image's content hash, so a renamed file costs nothing and a changed
preprocessing is a new fingerprint (a new folder). Parts are written atomically
(:mod:`graft.cacheparts`); racing writers may both write a key, and readers keep its first row. Both
featurize runners (local and Dask) and every reader of features go through these two modules.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graft import GraftError
from graft.atomic import write_json, write_with
from graft.images import Preprocess
from graft.integrity import read_part
from graft.quantize import with_precision

if TYPE_CHECKING:
    from graft.backbones import Backbone
    from graft.params import FeaturizeParams


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema([("sha256", pa.string()), ("feature", pa.list_(pa.float32(), dim))])


def feature_table(shas: list[str], feats: list[np.ndarray] | np.ndarray, dim: int) -> pa.Table:
    """Rows (sha256, float32[dim]) in the cache schema; a batch of the wrong shape is a GraftError."""
    matrix = np.asarray(np.concatenate(feats) if isinstance(feats, list) else feats, np.float32)
    if matrix.shape != (len(shas), dim):
        raise GraftError(f"engine returned features of shape {matrix.shape}, expected ({len(shas)}, {dim})")
    values = pa.array(matrix.ravel())
    return pa.table(
        {"sha256": pa.array(shas, pa.string()), "feature": pa.FixedSizeListArray.from_arrays(values, dim)},
        schema=feature_schema(dim),
    )


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def cache_dir_for(root: str | Path, name: str, fingerprint: str) -> Path:
    """The folder of one backbone description under the cache root."""
    return Path(root) / f"{_safe(name)}-{fingerprint}"


def parts(cache: Path, dim: int) -> list[Path]:
    """The cache's parts, each checked against the expected schema."""
    found = sorted(cache.glob("part-*.parquet"))
    expected = feature_schema(dim)
    for p in found:
        try:
            schema = pq.read_schema(p)
        except (pa.ArrowException, OSError) as exc:  # unreadable footer: say which file
            raise GraftError(f"feature cache part {p} is unreadable ({exc}); delete it and rerun") from None
        if not schema.remove_metadata().equals(expected):
            got = schema.field("feature").type if "feature" in schema.names else schema
            raise GraftError(
                f"feature cache part {p} has schema {got}, expected {expected.field('feature').type}; "
                "delete it and rerun"
            )
    return found


def open_cache(cache: Path, description: dict) -> None:
    """Create the cache folder or check that its meta.json matches this backbone description."""
    meta = cache / "meta.json"
    if meta.exists():
        try:
            found = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # empty or damaged: which backbone made these features is unknown
            why = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
            raise GraftError(
                f"feature cache {meta} is unreadable ({why}): remove {cache} and rerun featurize"
            ) from None
        if found != description:
            raise GraftError(f"feature cache {cache} was made by a different backbone config; remove it")
    else:
        write_json(meta, description)


def cached_keys(cache: Path, dim: int, among: Iterable[str] | None = None) -> set[str]:
    """The keys in the cache (only those ``among`` these, if given), reading only the ``sha256`` columns.

    With ``among`` the set is bounded by the manifest, not by a shared cache that may be far larger.
    """
    value_set = None if among is None else pa.array(sorted(set(among)), pa.string())
    keys: set[str] = set()
    for p in parts(cache, dim):
        col = read_part(p, ["sha256"]).column(0)
        if value_set is not None:
            col = pc.filter(col, pc.is_in(col, value_set=value_set))
        keys.update(col.to_pylist())
    return keys


def iter_features(cache: Path, dim: int, shas: Iterable[str]) -> Iterator[pa.Table]:
    """Stream the cached rows for ``shas``, one part at a time, each key once; raise if any is missing.

    Memory holds one part plus the key sets, never the whole cache.
    """
    wanted = set(shas)
    value_set = pa.array(sorted(wanted), pa.string())
    seen: set[str] = set()
    for p in parts(cache, dim):
        keys = read_part(p, ["sha256"]).column(0)
        hits = pc.is_in(keys, value_set=value_set)
        if not pc.any(hits).as_py():
            continue  # nothing of ours in this part: skip reading its features
        keep = []
        for i, key in zip(np.flatnonzero(hits.to_numpy()), pc.filter(keys, hits).to_pylist(), strict=True):
            if key not in seen:  # racing runs may both have written a key: keep its first row
                seen.add(key)
                keep.append(i)
        if keep:
            yield read_part(p).take(pa.array(keep, pa.int64()))
    if len(seen) != len(wanted):
        raise GraftError(f"{len(wanted) - len(seen)} image(s) missing from feature cache {cache}; rerun featurize")


def read_features(cache: Path, dim: int, shas: Iterable[str]) -> pa.Table:
    """Features for ``shas`` from the cache (one row per key) as one table; raise if any is missing."""
    tables = list(iter_features(cache, dim, shas))
    return pa.concat_tables(tables) if tables else feature_schema(dim).empty_table()


def write_features(cache: Path, dim: int, shas: Iterable[str], out: str | Path, metadata: dict[bytes, bytes]) -> int:
    """Write the cached features of ``shas`` to ``out`` atomically, streaming part by part; return the row count."""
    schema = feature_schema(dim).with_metadata(metadata)
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in iter_features(cache, dim, shas):
                writer.write_table(table.replace_schema_metadata(metadata))
                rows += table.num_rows

    write_with(out, write)
    return rows


def load_feature_table(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a features.parquet into {sha256: vector} plus its backbone metadata."""
    if not Path(path).is_file():
        raise GraftError(f"{path} not found: run `graft featurize` (or `dvc repro`) first")
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"graft.")}
    dim = table.schema.field("feature").type.list_size
    feats = table["feature"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table["sha256"].to_pylist(), feats, strict=True)), meta


def cached_pooled_features(path: str | Path, description: dict, shas: list[str]) -> np.ndarray | None:
    """The pooled last-layer features of ``shas`` (in order) from a feature table that featurize computed in fp32
    with the backbone, weights and preprocessing of ``description`` (a plain ``("last",)`` backbone's: every
    key but the width must match); None when it did not, or lacks a key."""
    try:
        theirs = json.loads((pq.read_schema(path).metadata or {})[b"graft.description"])
        if (
            "last" not in theirs.get("taps", ["last"])
            or "precision" in theirs
            or any(theirs.get(k) != v for k, v in description.items() if k != "feature_dim")
        ):
            return None
        feats, meta = load_feature_table(path)
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):  # absent, foreign or damaged: compute
        return None
    if not all(s in feats for s in shas):
        return None
    return select_columns(np.stack([feats[s] for s in shas]), tap_columns(meta, ("last",)))


def tap_columns(meta: dict[str, str], taps: tuple[str, ...] | list[str]) -> np.ndarray:
    """Column indices of ``taps`` (in the extractor's order) in a feature table with metadata ``meta``.

    A table written before taps existed holds the plain ``last`` features only.
    """
    from graft.registry import canonical_taps, tap_slices

    description = json.loads(meta.get("graft.description", "{}")) or {"taps": ["last"]}
    slices = tap_slices(description) if "feature_dim" in description else {}
    wanted = canonical_taps(taps)
    if not slices:
        if wanted != ("last",):
            raise GraftError(f"the feature table holds no {'/'.join(wanted)} features: rerun featurize")
        return np.array([], np.int64)  # marker: every column
    missing = [t for t in wanted if t not in slices]
    if missing:
        raise GraftError(
            f"the feature table holds no {missing[0]!r} features (featurize.taps): add it and rerun featurize"
        )
    return np.concatenate([np.arange(slices[t].start, slices[t].stop) for t in wanted])


def select_columns(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``x[:, columns]``, where an empty ``columns`` means every column (see :func:`tap_columns`)."""
    return x if not len(columns) else np.ascontiguousarray(x[:, columns])


def preprocess_of(description: dict) -> Preprocess:
    """The :class:`Preprocess` a backbone description stands for."""
    d = description
    return Preprocess(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


# --- what a featurize run must compute


@dataclass
class CachePlan:
    """One featurize run's view of the cache: where it is, what is missing, and how to build the backbone."""

    description: dict
    cache: Path
    shas: list[str]  # every unique key of the manifest, in manifest order (the feature table's rows)
    todo: list[tuple[str, str]]  # (sha256, path relative to data.root) not yet cached
    backbone: Callable[[], Backbone]  # builds (once) the torch backbone, only if an engine needs it

    @property
    def name(self) -> str:
        return str(self.description["name"])

    @property
    def fingerprint(self) -> str:
        from graft.backbones import fingerprint_of

        return fingerprint_of(self.description)

    @property
    def dim(self) -> int:
        return int(self.description["feature_dim"])

    @property
    def preprocess(self) -> Preprocess:
        return preprocess_of(self.description)

    @property
    def table_metadata(self) -> dict[bytes, bytes]:
        """The feature table's metadata: which backbone, and its description (where each tap's columns are)."""
        return {
            b"graft.backbone": self.name.encode(),
            b"graft.fingerprint": self.fingerprint.encode(),
            b"graft.description": json.dumps(self.description, sort_keys=True).encode(),
        }


def plan_cache(fp: FeaturizeParams, manifest: pd.DataFrame, backbone: Backbone | None = None) -> CachePlan:
    """Open the cache of ``fp``'s backbone and list the manifest's images it does not hold yet.

    The backbone is described without being built where the registry can (Lite0), so a fully cached
    rerun starts no model at all.
    """
    from graft.backbones import build_backbone, describe_backbone

    unique = manifest.drop_duplicates("sha256")

    cheap = None if backbone else describe_backbone(fp.backbone, fp.weights, fp.image_size, fp.taps, fp.raw_size)

    @functools.cache
    def bb() -> Backbone:
        built = backbone or build_backbone(fp.backbone, fp.weights, fp.image_size, fp.taps, fp.raw_size)
        if cheap and built.describe() != cheap:
            raise GraftError(
                f"{fp.backbone}: the described and the built backbone disagree (a graft bug, or graft, "
                "timm or the weights differ between machines): use one version everywhere"
            )
        return built

    description = with_precision(cheap or bb().describe(), fp.precision)
    plan = CachePlan(description, Path(), list(unique["sha256"]), [], bb)
    plan.cache = cache_dir_for(fp.cache_dir, plan.name, plan.fingerprint)
    open_cache(plan.cache, description)
    have = cached_keys(plan.cache, plan.dim, among=unique["sha256"])  # bounded by the manifest, not the shared cache
    plan.todo = [(sha, path) for sha, path in zip(unique["sha256"], unique["path"], strict=True) if sha not in have]
    return plan
