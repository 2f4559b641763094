"""Featurize: run the frozen backbone over every image not yet in the content-addressed cache.

The data path: decoder threads turn files into fixed-size batches (:mod:`graft.sources`, the same
``load_rgb`` + ``preprocess`` as ingest and predict), an engine (:mod:`graft.engine`) turns batches
into features while the next batches decode, and features stream into the cache
(:mod:`graft.cache`) as Parquet parts of ``part_rows`` rows. Parts are written atomically as they
fill (and on an error, with what was finished), so a killed run keeps its finished parts and a rerun
computes only the rest. Memory stays flat in the number of images: one part, a few batches in
flight, and the key sets.

When every image is already cached, Lite0 is described without being built and no engine starts:
the rerun reads the cache's ``sha256`` columns and writes this manifest's feature table.
This module is the local runner; ``featurize.runner: dask`` runs :mod:`graft.tasks.shard` instead
(the dispatcher in :mod:`graft.stages` chooses).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from graft.backbones import Backbone
from graft.cache import PartWriter, plan_cache, write_features
from graft.engine import Engine, make_engine
from graft.images import Preprocess, prefetch_map
from graft.params import Params
from graft.sources import decoded_batches
from graft.tasks import stage_task

log = logging.getLogger("graft.featurize")


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


def featurize(params: Params, backbone: Backbone | None = None) -> dict:
    """Fill the cache for every image in the manifest, then write this manifest's feature table.

    Args:
        params: the run's params (``featurize`` section, data paths).
        backbone: an already built backbone (tests); by default it is built from params, and only
            when its description or its torch model is actually needed.

    Returns:
        A summary: counts, the engine used, seconds and throughput of the computed part.
    """
    t_start = time.perf_counter()
    fp = params.featurize
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet", columns=["path", "sha256"])
    plan = plan_cache(fp, manifest, backbone)
    root = Path(params.data.root)
    todo = [(sha, str(root / path)) for sha, path in plan.todo]
    engine_name, computed, seconds = None, 0, 0.0
    if todo:
        engine = make_engine(fp, plan.cache, plan.description, plan.backbone)
        engine_name = engine.name
        t0 = time.perf_counter()
        computed = compute_features(engine, plan.preprocess, plan.dim, todo, plan.cache, fp.batch_size,
                                    fp.workers, fp.part_rows, desc=f"featurize {plan.name}")
        seconds = time.perf_counter() - t0
    write_features(plan.cache, plan.dim, plan.shas, fp.out, plan.table_metadata)
    return {"backbone": plan.name, "fingerprint": plan.fingerprint, "engine": engine_name, "images": len(plan.shas),
            "computed": computed, "from_cache": len(plan.shas) - computed, "seconds": round(seconds, 2),
            "img_per_s": round(computed / seconds, 1) if computed else None,
            "stage_seconds": round(time.perf_counter() - t_start, 2), "cache": str(plan.cache)}


featurize_task = stage_task(featurize, "featurize")
