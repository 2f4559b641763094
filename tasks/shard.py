"""Sharded featurize and predict: shard planning and the Prefect tasks a Dask worker runs.

``graft.flows.scale`` plans on the driver and submits one task per shard; this module holds the
shards and what a worker does with one. The data path of a featurize shard is the local runner's
(:func:`graft.sources.decoded_batches` -> engine -> :mod:`graft.cache` part), one part per shard:

    (sha256, url) items  ->  read + sha256 check + decode  ->  engine  ->  <cache>/part-shard-<id>.parquet

* Shards are cut from the missing images sorted by content hash, and a shard's id is the hash of
  its keys, so a retried or rescheduled shard writes the same final file with the same rows: a
  lost worker or a duplicate run never duplicates a key, and a shard whose part already holds
  exactly its keys returns at once.
* Each worker process builds its engine (the ONNX session, or the torch backbone) once and keeps
  it for every later shard; :data:`LOADS` counts the builds.
* Images are read through fsspec, so ``data.root`` may be a shared folder or ``s3://...``; the
  feature cache must be a shared POSIX folder that every worker can write.
* One shard uses one core: decoding runs inline and the engine is single-threaded per call; a
  worker's Dask threads are its parallelism (``featurize.dask.threads_per_worker``).

Torch is imported only when a featurize shard builds its engine: predict shards need
onnxruntime, Pillow and NumPy alone.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from graft import GraftError
from graft.cache import CachePlan, plan_cache, preprocess_of, write_features
from graft.cacheparts import PartWriter, holds_exactly
from graft.daskworker import MODELS, attempt, worker_name, worker_threads
from graft.images import Preprocess
from graft.params import FeaturizeParams, Params
from graft.sources import decoded_batches, resolve_url
from graft.tasks import retry_transient

SHARD_PREFIX = "part-shard-"  # matches the cache's part-*.parquet glob, so readers need no change


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
        return preprocess_of(self.description)


def part_path(job: FeaturizeJob, shard: Shard) -> Path:
    return Path(job.cache) / f"{SHARD_PREFIX}{shard.id}.parquet"


def _build_engine(job: FeaturizeJob) -> Any:
    """The configured engine in this worker, one single-threaded stream per Dask thread."""
    from graft.backbones import build_backbone
    from graft.engine import make_engine

    n = worker_threads()
    fp = job.fp.model_copy(update={"threads": n, "streams": n})

    def backbone() -> Any:
        bb = build_backbone(fp.backbone, fp.weights, fp.image_size, fp.taps, fp.raw_size)
        if bb.describe() != job.description:
            raise GraftError(
                f"worker {worker_name()} builds {fp.backbone} with another fingerprint than the driver "
                f"(graft, timm or weights differ): install the same versions on every worker"
            )
        return bb

    return make_engine(fp, Path(job.cache), job.description, backbone)


def worker_engine(job: FeaturizeJob) -> Any:
    """This process's engine for the job's cache, built on the first shard only."""
    return MODELS.get(("featurize", job.cache, job.fp.engine, job.fp.amp), "featurize", lambda: _build_engine(job))


def run_featurize_shard(job: FeaturizeJob, shard: Shard) -> dict:
    """Compute one shard's features and publish them as one atomic Parquet part (idempotent).

    Returns:
        A small record: shard id, rows, rows computed (0 when an earlier attempt finished it),
        seconds (all of it), load_s (building the engine: the worker's first shard only), worker,
        Prefect attempt and engine.
    """
    t0 = time.perf_counter()
    part = part_path(job, shard)
    base = {"shard": shard.id, "rows": len(shard.items), "worker": worker_name(), "attempt": attempt()}
    if holds_exactly(part, shard.keys):
        return {**base, "computed": 0, "seconds": 0.0, "load_s": 0.0, "engine": None}
    t_load = time.perf_counter()
    engine = worker_engine(job)
    load_s = time.perf_counter() - t_load
    rows = PartWriter(Path(job.cache), job.dim, part_rows=len(shard.items) + 1)  # one part, flushed below
    for keys, x in decoded_batches(shard.items, job.preprocess, job.fp.batch_size, job.fp.dask.decode_threads):
        rows.add(keys, engine(x))
    rows.flush(part)
    return {
        **base,
        "computed": rows.written,
        "seconds": round(time.perf_counter() - t0, 3),
        "load_s": round(load_s, 3),
        "engine": engine.name,
    }


featurize_shard = task(
    name="featurize-shard",
    task_run_name="featurize-shard-{shard.id}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,  # the Parquet cache is the cache
)(run_featurize_shard)


@dataclass
class FeaturizePlan:
    """The driver's view of a dask featurize: the cache plan, the job every shard shares, and the shards."""

    cache: CachePlan
    job: FeaturizeJob
    shards: list[Shard]


def plan_featurize(params: Params) -> FeaturizePlan:
    """Open the cache, find the manifest's images not in it, cut them into shards, export ONNX once if needed.

    Runs on the driver, which must see the manifest and the cache; only the backbone's
    description is needed here (Lite0 is not even built unless its ONNX graph is missing).
    """
    from graft.engine import make_engine, resolve_engine

    fp = params.featurize
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet", columns=["path", "sha256"])
    plan = plan_cache(fp, manifest)
    # Absolute paths: workers elsewhere do not share the driver's working directory (they need the same mounts).
    root = params.data.root if "://" in params.data.root else str(Path(params.data.root).resolve())
    todo = [(sha, resolve_url(root, path)) for sha, path in plan.todo]
    job = FeaturizeJob(fp, str(plan.cache.resolve()), plan.description)
    if todo and resolve_engine(fp.engine) == "onnxruntime":
        # Export and check the graph here, once, rather than in every worker at the same time.
        make_engine(fp.model_copy(update={"threads": 1, "streams": 1}), plan.cache, plan.description, plan.backbone)
    return FeaturizePlan(plan, job, make_shards(todo, fp.shard_size))


def finish_featurize(plan: FeaturizePlan, out: str | Path) -> int:
    """Write the manifest's feature table from the cache (raises if a key is missing); return its rows."""
    return write_features(plan.cache.cache, plan.cache.dim, plan.cache.shas, out, plan.cache.table_metadata)


# --- predict shards


@dataclass(frozen=True)
class PredictJob:
    """What every predict shard shares: an exported model every worker can read, and the batch size."""

    model: str
    batch_size: int = 32


def worker_classifier(model: str) -> Any:
    """This process's onnxruntime classifier for ``model``, loaded on the first shard only."""
    from graft.predict import OnnxClassifier

    st = os.stat(model)  # a re-exported model at the same path is a new key
    return MODELS.get(
        ("predict", model, st.st_size, st.st_mtime_ns), "predict", lambda: OnnxClassifier(model, threads=1)
    )  # one core per shard, as featurize


def run_predict_shard(job: PredictJob, shard: Shard) -> list[dict]:
    """Top-1 label and probability for each url of the shard, or why a file was skipped."""
    from graft.predict import predict_files

    return list(predict_files(worker_classifier(job.model), [u for _, u in shard.items], job.batch_size))


predict_shard = task(
    name="predict-shard",
    task_run_name="predict-shard-{shard.id}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)(run_predict_shard)
