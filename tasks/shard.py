"""Sharded featurize and predict: the work a Dask worker does, wrapped as Prefect tasks.

``flows/scale.py`` plans on the driver and submits one Prefect task per shard to a Dask cluster;
everything a worker runs lives here. The data path of one featurize shard:

    (sha256, url) items  ->  fsspec read + sha256 check  ->  load_rgb + preprocess  ->  engine
                         ->  <cache>/part-shard-<id>.parquet   (one atomic write per shard)

* Shards are cut from the missing images sorted by content hash, and a shard's id is the hash of
  its keys, so a retried or rescheduled shard writes the same final file with the same rows: a
  lost worker or a duplicate run never duplicates a key, and a shard whose part already holds
  exactly its keys returns at once.
* Each worker process builds its engine (the ONNX session, or the torch backbone) once and keeps
  it for every later shard (:func:`worker_engine`); :data:`LOADS` counts the builds.
* Images are read through fsspec, so ``data.root`` may be a shared folder or ``s3://...``; the
  feature cache must be a shared POSIX folder that every worker can write.
* One shard uses one core: decoding runs inline and the engine is single-threaded per call; a
  worker's Dask threads are its parallelism (``featurize.dask.threads_per_worker``).

``tasks.featurize`` (and so torch) is imported only inside the featurize functions: predict
shards need onnxruntime, Pillow and NumPy alone.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from graft import GraftError
from graft.atomic import write_parquet
from graft.images import IMAGE_EXTENSIONS, BadImage, Preprocess, load_rgb, prefetch_map, preprocess
from graft.params import FeaturizeParams, Params

SHARD_PREFIX = "part-shard-"  # matches the cache's part-*.parquet glob, so readers need no change
LOADS: Counter = Counter()  # engine / model builds in this process, by kind ("featurize", "predict")
_KEEP_MODELS = 2  # models kept per worker process: a run's, plus one from an overlapping run


# --- shards


@dataclass(frozen=True)
class Shard:
    """A slice of work: ``items`` are (key, url) pairs; ``id`` is derived from the keys."""

    id: str
    items: tuple[tuple[str, str], ...]

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.items]


def shard_id(keys: Sequence[str]) -> str:
    """A short content hash of a shard's (sorted) keys: the same keys give the same id in every run."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def make_shards(items: Sequence[tuple[str, str]], size: int) -> list[Shard]:
    """Sort (key, url) pairs by key, drop repeated keys, and cut them into shards of ``size``."""
    if size < 1:
        raise GraftError(f"shard size must be at least 1, got {size}")
    ordered = sorted(dict(items).items())  # one url per key: the same bytes need one forward pass
    chunks = [tuple(ordered[i : i + size]) for i in range(0, len(ordered), size)]
    return [Shard(shard_id([k for k, _ in c]), c) for c in chunks]


def resolve_url(root: str, path: str) -> str:
    """Where a manifest path lives: kept if absolute or a URL, else joined to ``data.root`` (a folder or URL)."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in root:
        return f"{root.rstrip('/')}/{path}"
    return str(Path(root) / path)


def read_bytes(url: str) -> bytes:
    """The bytes of a local path or any fsspec URL (s3://, gs://, http://, memory://, ...)."""
    import fsspec

    with fsspec.open(url, "rb") as fh:
        return fh.read()


def _retry_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a shard only on I/O errors that may pass (a flaky mount or object store), not on bad inputs."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError)


def _attempt() -> int:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # not inside a Dask worker (tests call shards directly)
        return f"pid-{os.getpid()}"


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError):
        return 1


class _ModelCache:
    """Per-process models keyed by what determines them, built once under a lock (Dask threads share them)."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, kind: str, build: Callable[[], Any]) -> Any:
        with self._lock:  # a second thread of this worker waits for the first build instead of repeating it
            if key not in self._items:
                self._items[key] = build()
                LOADS[kind] += 1
                while len(self._items) > _KEEP_MODELS:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


_MODELS = _ModelCache()


def load_counts() -> dict[str, int]:
    """Models built by this process so far (gathered from each worker with ``client.run``)."""
    return dict(LOADS)


def probe(kind: str) -> dict:
    """Run on every worker before the shards: imports what the shards need and says who the worker is."""
    import importlib

    import graft

    importlib.import_module("tasks.featurize" if kind == "featurize" else "graft.predict")
    return {"graft": graft.__version__, "pid": os.getpid(), "threads": _worker_threads()}


# --- featurize shards


@dataclass(frozen=True)
class FeaturizeJob:
    """What every featurize shard of one run shares: the featurize params and the opened cache."""

    fp: FeaturizeParams
    cache: str  # <cache_dir>/<backbone>-<fingerprint>, on storage every worker can write
    description: dict  # the backbone description the cache was opened with (workers check theirs)

    @property
    def dim(self) -> int:
        return int(self.description["feature_dim"])

    @property
    def preprocess(self) -> Preprocess:
        d = self.description
        return Preprocess(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


def part_path(job: FeaturizeJob, shard: Shard) -> Path:
    return Path(job.cache) / f"{SHARD_PREFIX}{shard.id}.parquet"


def _build_engine(job: FeaturizeJob):
    """The configured engine in this worker, one single-threaded stream per Dask thread."""
    from graft.backbones import build_backbone
    from tasks.featurize import make_engine

    n = _worker_threads()
    fp = job.fp.model_copy(update={"threads": n, "streams": n})

    def backbone():
        bb = build_backbone(fp.backbone, fp.weights, fp.image_size)
        if bb.describe() != job.description:
            raise GraftError(f"worker {_worker_name()} builds {fp.backbone} with another fingerprint than the driver "
                             f"(graft, timm or weights differ): install the same versions on every worker")
        return bb

    return make_engine(fp, Path(job.cache), job.description, backbone)


def worker_engine(job: FeaturizeJob):
    """This process's engine for the job's cache, built on the first shard only."""
    return _MODELS.get(("featurize", job.cache, job.fp.engine, job.fp.amp), "featurize", lambda: _build_engine(job))


def _pixels(sha: str, url: str, pp: Preprocess) -> np.ndarray:
    """Read, check and preprocess one image; a changed, missing or unreadable file is a GraftError."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise GraftError(f"{url}: not found (moved or deleted since ingest); rerun ingest") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise GraftError(f"{url} changed since ingest (content hash differs); rerun ingest")
    try:
        return preprocess(load_rgb(data, min_side=pp.resize)[0], pp)
    except BadImage as exc:
        raise GraftError(f"{url}: cannot decode for featurize ({exc}); rerun ingest") from None


def _decoded(items: Sequence[tuple[str, str]], pp: Preprocess, batch_size: int,
             threads: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, NCHW batch) in order; decoding overlaps inference only when ``threads`` > 0."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def decode(chunk):
        return [k for k, _ in chunk], np.stack([_pixels(k, u, pp) for k, u in chunk])

    return prefetch_map(decode, chunks, threads) if threads else map(decode, chunks)


def _holds_exactly(part: Path, keys: Sequence[str]) -> bool:
    """True when ``part`` exists and its rows are exactly ``keys`` (a finished earlier attempt)."""
    if not part.is_file():
        return False
    try:
        found = pq.read_table(part, columns=["sha256"]).column(0).to_pylist()
    except Exception:  # noqa: BLE001 - unreadable: recompute and replace it
        return False
    return sorted(found) == sorted(keys)


def run_featurize_shard(job: FeaturizeJob, shard: Shard) -> dict:
    """Compute one shard's features and publish them as one atomic Parquet part (idempotent).

    Returns:
        A small record: shard id, rows, rows computed (0 when an earlier attempt finished it),
        seconds, worker, Prefect attempt and engine.
    """
    from tasks.featurize import feature_schema

    t0 = time.perf_counter()
    part = part_path(job, shard)
    base = {"shard": shard.id, "rows": len(shard.items), "worker": _worker_name(), "attempt": _attempt()}
    if _holds_exactly(part, shard.keys):
        return {**base, "computed": 0, "seconds": 0.0, "engine": None}
    engine = worker_engine(job)
    keys, feats = [], []
    for k, x in _decoded(shard.items, job.preprocess, job.fp.batch_size, job.fp.dask.decode_threads):
        out = np.asarray(engine(x), np.float32)
        if out.shape != (len(k), job.dim):
            raise GraftError(f"engine returned features of shape {out.shape}, expected ({len(k)}, {job.dim})")
        keys += k
        feats.append(out)
    values = pa.array(np.concatenate(feats).ravel())
    table = pa.table({"sha256": pa.array(keys, pa.string()),
                      "feature": pa.FixedSizeListArray.from_arrays(values, job.dim)}, schema=feature_schema(job.dim))
    write_parquet(part, table)
    return {**base, "computed": len(keys), "seconds": round(time.perf_counter() - t0, 3), "engine": engine.name}


featurize_shard = task(run_featurize_shard, name="featurize-shard", task_run_name="featurize-shard-{shard.id}",
                       retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                       retry_condition_fn=_retry_io, cache_policy=NO_CACHE)  # the Parquet cache is the cache


class _Named(NamedTuple):
    name: str
    fingerprint: str


@dataclass
class FeaturizePlan:
    """The driver's view of a dask featurize: the job, its shards and the manifest's keys."""

    job: FeaturizeJob
    shards: list[Shard]
    shas: list[str]  # every unique key of the manifest, for the feature table
    name: str
    fingerprint: str


def plan_featurize(params: Params) -> FeaturizePlan:
    """Open the cache, find the manifest's images not in it, cut them into shards, export ONNX once if needed.

    Runs on the driver, which must see the manifest and the cache; only the backbone's
    description is needed here (Lite0 is not even built unless its ONNX graph is missing).
    """
    import functools

    import pandas as pd

    from graft.backbones import build_backbone, describe_backbone, fingerprint_of
    from graft.engine import resolve_engine
    from tasks.featurize import cache_dir_for, cached_keys, make_engine, open_cache

    fp = params.featurize
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet", columns=["path", "sha256"])
    unique = manifest.drop_duplicates("sha256")
    bb = functools.cache(lambda: build_backbone(fp.backbone, fp.weights, fp.image_size))
    description = describe_backbone(fp.backbone, fp.weights, fp.image_size) or bb().describe()
    name, fingerprint, dim = description["name"], fingerprint_of(description), description["feature_dim"]
    cache = cache_dir_for(fp.cache_dir, _Named(name, fingerprint))  # type: ignore[arg-type]  # reads .name, .fingerprint
    open_cache(cache, description)
    have = cached_keys(cache, dim, among=unique["sha256"])  # bounded by the manifest, not the shared cache
    # Absolute paths: workers elsewhere do not share the driver's working directory (they need the same mounts).
    root = params.data.root if "://" in params.data.root else str(Path(params.data.root).resolve())
    todo = [(sha, resolve_url(root, path)) for sha, path in zip(unique["sha256"], unique["path"]) if sha not in have]
    job = FeaturizeJob(fp, str(cache.resolve()), description)
    if todo and resolve_engine(fp.engine) == "onnxruntime":
        # Export and check the graph here, once, rather than in every worker at the same time.
        make_engine(fp.model_copy(update={"threads": 1, "streams": 1}), cache, description, bb)
    return FeaturizePlan(job, make_shards(todo, fp.shard_size), list(unique["sha256"]), name, fingerprint)


def finish_featurize(plan: FeaturizePlan, out: str | Path) -> int:
    """Write the manifest's feature table from the cache (raises if a key is missing); return its rows."""
    from tasks.featurize import write_features

    meta = {b"graft.backbone": plan.name.encode(), b"graft.fingerprint": plan.fingerprint.encode()}
    return write_features(Path(plan.job.cache), plan.job.dim, plan.shas, out, meta)


def cache_rows(cache: str | Path) -> tuple[dict[str, np.ndarray], int]:
    """Every row of a cache folder as {sha256: vector}, plus how many rows repeated a key."""
    out: dict[str, np.ndarray] = {}
    repeats = 0
    for p in sorted(Path(cache).glob("part-*.parquet")):
        t = pq.read_table(p)
        dim = t.schema.field("feature").type.list_size
        feats = t["feature"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        for k, v in zip(t["sha256"].to_pylist(), feats):
            repeats += k in out
            out[k] = v
    return out, repeats


def compare_caches(a: str | Path, b: str | Path) -> dict:
    """Keys, repeated rows and the largest absolute feature difference between two cache folders."""
    ra, dup_a = cache_rows(a)
    rb, dup_b = cache_rows(b)
    same = ra.keys() == rb.keys()
    diff = max((float(np.abs(ra[k] - rb[k]).max()) for k in ra), default=0.0) if same else float("inf")
    return {"rows_a": len(ra), "rows_b": len(rb), "repeated_a": dup_a, "repeated_b": dup_b,
            "same_keys": same, "max_abs_diff": diff}


# --- predict shards


@dataclass(frozen=True)
class PredictJob:
    """What every predict shard shares: an exported model every worker can read, and the batch size."""

    model: str
    batch_size: int = 32


def worker_classifier(model: str):
    """This process's onnxruntime classifier for ``model``, loaded on the first shard only."""
    from graft.predict import OnnxClassifier

    st = os.stat(model)  # a re-exported model at the same path is a new key
    return _MODELS.get(("predict", model, st.st_size, st.st_mtime_ns), "predict",
                       lambda: OnnxClassifier(model, threads=1))  # one core per shard, as featurize


def run_predict_shard(job: PredictJob, shard: Shard) -> list[dict]:
    """Top-1 label and probability for each url of the shard, or why a file was skipped."""
    clf = worker_classifier(job.model)
    pp = clf.preprocess
    out: list[dict] = []
    urls = [u for _, u in shard.items]
    for i in range(0, len(urls), job.batch_size):
        ok, arrays = [], []
        for url in urls[i : i + job.batch_size]:
            try:
                arrays.append(preprocess(load_rgb(read_bytes(url), min_side=pp.resize)[0], pp))
                ok.append(url)
            except FileNotFoundError:
                out.append({"path": url, "label": None, "probability": None, "error": "file not found"})
            except BadImage as exc:
                out.append({"path": url, "label": None, "probability": None, "error": str(exc)})
        if arrays:
            proba = clf.predict_arrays(np.stack(arrays))
            top = proba.argmax(axis=1)
            out += [{"path": u, "label": clf.classes[j], "probability": float(p[j]), "error": None}
                    for u, j, p in zip(ok, top, proba)]
    return out


predict_shard = task(run_predict_shard, name="predict-shard", task_run_name="predict-shard-{shard.id}",
                     retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                     retry_condition_fn=_retry_io, cache_policy=NO_CACHE)


def list_targets(target: str) -> list[str]:
    """Image files under a local file/folder or an fsspec URL, hidden entries skipped, sorted."""
    if "://" not in target:
        from graft.predict import list_images

        return [str(p) for p in list_images(target)]
    import fsspec

    fs, root = fsspec.core.url_to_fs(target)
    if fs.isfile(root):
        return [target]
    if not fs.isdir(root):
        raise GraftError(f"{target}: no such file or folder")

    def wanted(p: str) -> bool:
        rel = p[len(root):].strip("/").split("/")
        return Path(p).suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel)

    return sorted(fs.unstrip_protocol(p) for p in fs.find(root) if wanted(p))


PREDICTION_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string()), ("probability", pa.float64()),
                               ("error", pa.string())])


def write_predictions(records: list[dict], out: str | Path) -> Path:
    """All shards' records, sorted by path, as one Parquet file written atomically."""
    rows = sorted(records, key=lambda r: r["path"])
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    return write_parquet(out, table)
