"""Featurize: run the frozen backbone over every image not yet in the content-addressed cache.

Cache layout (shared by all runs and all checkouts that point at the same ``cache_dir``)::

    <cache_dir>/<backbone>-<fingerprint>/meta.json        what the fingerprint stands for
    <cache_dir>/<backbone>-<fingerprint>/backbone.onnx    the checked ONNX export (onnxruntime engine)
    <cache_dir>/<backbone>-<fingerprint>/part-*.parquet   sha256: string, feature: float32[d]

The data path: decoder threads turn files into fixed-size batches (the same ``load_rgb`` +
``preprocess`` as ingest and predict), an engine (:mod:`graft.engine`) turns batches into
features while the next batches decode, and features stream into Parquet parts of ``part_rows``
rows. Parts are written atomically as they fill (and on an error, with what was finished), so a
killed run keeps its finished parts and a rerun computes only the rest. Memory stays flat in the
number of images: one part, a few batches in flight, and the key sets.

When every image is already cached, Lite0 is described without being built and no engine starts:
the rerun reads the cache's ``sha256`` columns and writes this manifest's feature table.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from graft import GraftError
from graft.atomic import write_json, write_parquet, write_with
from graft.backbones import Backbone, build_backbone, describe_backbone, fingerprint_of
from graft.engine import Engine, TorchEngine, ort_engine, resolve_engine
from graft.images import BadImage, Preprocess, load_rgb, prefetch_map, preprocess
from graft.params import FeaturizeParams, Params
from tasks import stage_task

log = logging.getLogger("graft.featurize")


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema([("sha256", pa.string()), ("feature", pa.list_(pa.float32(), dim))])


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def cache_dir_for(root: str | Path, bb: Backbone) -> Path:
    return Path(root) / f"{_safe(bb.name)}-{bb.fingerprint}"


def _parts(cache: Path, dim: int) -> list[Path]:
    """The cache's parts, each checked against the expected schema."""
    parts = sorted(cache.glob("part-*.parquet"))
    expected = feature_schema(dim)
    for p in parts:
        try:
            schema = pq.read_schema(p)
        except Exception as exc:  # noqa: BLE001 - unreadable footer: say which file
            raise GraftError(f"feature cache part {p} is unreadable ({exc}); delete it and rerun") from None
        if not schema.remove_metadata().equals(expected):
            raise GraftError(f"feature cache part {p} has schema {schema.field('feature').type if 'feature' in schema.names else schema}, "
                             f"expected {expected.field('feature').type}; delete it and rerun")
    return parts


def open_cache(cache: Path, description: dict) -> None:
    """Create the cache folder or check that its meta.json matches this backbone description."""
    meta = cache / "meta.json"
    if meta.exists():
        if json.loads(meta.read_text()) != description:
            raise GraftError(f"feature cache {cache} was made by a different backbone config; remove it")
    else:
        write_json(meta, description)


def cached_keys(cache: Path, dim: int, among: Iterable[str] | None = None) -> set[str]:
    """The keys in the cache (only those ``among`` these, if given), reading only the ``sha256`` columns.

    With ``among`` the set is bounded by the manifest, not by a shared cache that may be far larger.
    """
    value_set = None if among is None else pa.array(sorted(set(among)), pa.string())
    keys: set[str] = set()
    for p in _parts(cache, dim):
        col = pq.read_table(p, columns=["sha256"]).column(0)
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
    for p in _parts(cache, dim):
        keys = pq.read_table(p, columns=["sha256"]).column(0)
        hits = pc.is_in(keys, value_set=value_set)
        if not pc.any(hits).as_py():
            continue  # nothing of ours in this part: skip reading its features
        keep = []
        for i, key in zip(np.flatnonzero(hits.to_numpy()), pc.filter(keys, hits).to_pylist()):
            if key not in seen:  # racing runs may both have written a key: keep its first row
                seen.add(key)
                keep.append(i)
        if keep:
            yield pq.read_table(p).take(pa.array(keep, pa.int64()))
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


# --- compute: decode -> engine -> parts


def _decode(chunk: list[tuple[str, str]], pp: Preprocess) -> tuple[list[str], np.ndarray]:
    shas, arrays = [], []
    for sha, path in chunk:
        try:
            data = Path(path).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise GraftError(f"{path} changed since ingest (content hash differs); rerun ingest")
            arrays.append(preprocess(load_rgb(data, min_side=pp.resize)[0], pp))
        except BadImage as exc:
            raise GraftError(f"{path}: cannot decode for featurize ({exc}); rerun ingest") from None
        except OSError as exc:  # kept an OSError: a transient read failure is retried by the Prefect task
            raise OSError(exc.errno, f"{path}: cannot read for featurize ({exc.strerror or exc})") from exc
        shas.append(sha)
    return shas, np.stack(arrays)


def decoded_batches(items: list[tuple[str, str]], pp: Preprocess, batch_size: int, workers: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decode fixed-size batches in a pool of ``workers`` threads, at most ``workers + 1`` batches ahead."""
    chunks = (items[i : i + batch_size] for i in range(0, len(items), batch_size))
    yield from prefetch_map(functools.partial(_decode, pp=pp), chunks, workers)


def feature_batches(engine: Engine, items: list[tuple[str, str]], pp: Preprocess, batch_size: int,
                    workers: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(sha256s, features) per batch, in order: decoding overlaps inference, both bounded.

    Decoder threads run ahead of the engine; an engine with several streams gets that many
    batches at once (one thread each). Pillow and onnxruntime release the GIL.
    """
    batches = decoded_batches(items, pp, batch_size, workers)
    if engine.streams <= 1:
        for shas, x in batches:
            yield shas, engine(x)
    else:
        yield from prefetch_map(lambda b: (b[0], engine(b[1])), batches, engine.streams)


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

    def flush(self) -> None:
        if not self.shas:
            return
        values = pa.array(np.concatenate(self.feats).ravel())
        table = pa.table({"sha256": pa.array(self.shas, pa.string()),
                          "feature": pa.FixedSizeListArray.from_arrays(values, self.dim)}, schema=feature_schema(self.dim))
        write_parquet(self.cache / f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet", table)
        self.written += len(self.shas)
        self.shas, self.feats = [], []


def compute_features(engine: Engine, pp: Preprocess, dim: int, items: list[tuple[str, str]], cache: Path,
                     batch_size: int, workers: int, part_rows: int, desc: str = "featurize") -> int:
    """Run ``engine`` over ``items`` (sha256, path) and append the features to ``cache`` in parts.

    On an error or interrupt the rows already computed are flushed first, so a rerun resumes.

    Returns:
        The number of images computed.
    """
    parts = PartWriter(cache, dim, part_rows)
    batches = feature_batches(engine, items, pp, batch_size, workers)
    with tqdm(total=len(items), unit="img", desc=desc, disable=None) as bar, contextlib.closing(batches):
        try:
            for shas, feats in batches:
                parts.add(shas, feats)
                bar.update(len(shas))
        except BaseException:
            try:
                parts.flush()  # keep what was finished
            except Exception:  # noqa: BLE001 - the original error matters more (e.g. the disk is full)
                log.warning("could not keep %d computed rows after an error", len(parts.shas))
            raise
        parts.flush()
    return parts.written


# --- the stage


def make_engine(fp: FeaturizeParams, cache: Path, description: dict, backbone: Callable[[], Backbone]) -> Engine:
    """The configured engine; ``backbone`` is called only if the torch model is needed."""
    name = resolve_engine(fp.engine)
    if name == "torch":
        return TorchEngine(backbone().model, fp.threads, fp.amp)
    meta = {"graft.kind": "backbone", "graft.backbone": description["name"],
            "graft.describe": json.dumps(description, sort_keys=True)}
    return ort_engine(cache, fingerprint_of(description), lambda: backbone().model, description["crop"], meta,
                      fp.threads, fp.streams)


def _preprocess_of(description: dict) -> Preprocess:
    d = description
    return Preprocess(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


def featurize(params: Params, backbone: Backbone | None = None) -> dict:
    """Fill the cache for every image in the manifest, then write this manifest's feature table.

    Args:
        params: the run's params (``featurize`` section, data paths).
        backbone: an already built backbone (tests); by default it is built from params, and only
            when its description or its torch model is actually needed.

    Returns:
        A summary: counts, the engine used, seconds and throughput of the computed part.
    """
    if params.featurize.runner == "dask":  # shards as Prefect tasks on a Dask cluster (flows/scale.py, docs/scale.md)
        from flows.scale import featurize_dask

        return featurize_dask(params)  # workers build their own backbone: ``backbone`` is not used there
    t_start = time.perf_counter()
    fp = params.featurize
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet", columns=["path", "sha256"])
    unique = manifest.drop_duplicates("sha256")

    @functools.cache
    def bb() -> Backbone:
        return backbone or build_backbone(fp.backbone, fp.weights, fp.image_size)

    cheap = None if backbone else describe_backbone(fp.backbone, fp.weights, fp.image_size)
    description = cheap or bb().describe()
    name, fingerprint, dim = description["name"], fingerprint_of(description), description["feature_dim"]
    cache = Path(fp.cache_dir) / f"{_safe(name)}-{fingerprint}"
    open_cache(cache, description)
    have = cached_keys(cache, dim, among=unique["sha256"])
    root = Path(params.data.root)
    todo = [(sha, str(root / path)) for sha, path in zip(unique["sha256"], unique["path"]) if sha not in have]
    engine_name, computed, seconds = None, 0, 0.0
    if todo:
        engine = make_engine(fp, cache, description, bb)
        if cheap and bb.cache_info().currsize and bb().describe() != cheap:
            raise GraftError(f"{name}: the described and the built backbone disagree (a graft bug); use another backbone")
        engine_name = engine.name
        t0 = time.perf_counter()
        computed = compute_features(engine, _preprocess_of(description), dim, todo, cache, fp.batch_size,
                                    fp.workers, fp.part_rows, desc=f"featurize {name}")
        seconds = time.perf_counter() - t0
    meta = {b"graft.backbone": name.encode(), b"graft.fingerprint": fingerprint.encode()}
    write_features(cache, dim, unique["sha256"], fp.out, meta)
    return {"backbone": name, "fingerprint": fingerprint, "engine": engine_name, "images": len(unique),
            "computed": computed, "from_cache": len(unique) - computed, "seconds": round(seconds, 2),
            "img_per_s": round(computed / seconds, 1) if computed else None,
            "stage_seconds": round(time.perf_counter() - t_start, 2), "cache": str(cache)}


def load_feature_table(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a features.parquet into {sha256: vector} plus its backbone metadata."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"graft.")}
    dim = table.schema.field("feature").type.list_size
    feats = table["feature"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table["sha256"].to_pylist(), feats)), meta


featurize_task = stage_task(featurize, "featurize")
