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

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from graft.cache import plan_cache, write_features
from graft.engine import fill_cache
from graft.params import Params
from graft.tasks import stage_task

if TYPE_CHECKING:
    from graft.backbones import Backbone


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
    engine_name, computed, seconds = fill_cache(fp, plan, params.data.root)
    write_features(plan.cache, plan.dim, plan.shas, fp.out, plan.table_metadata)
    return {
        "backbone": plan.name,
        "fingerprint": plan.fingerprint,
        "engine": engine_name,
        "images": len(plan.shas),
        "computed": computed,
        "from_cache": len(plan.shas) - computed,
        "seconds": round(seconds, 2),
        "img_per_s": round(computed / seconds, 1) if computed else None,
        "stage_seconds": round(time.perf_counter() - t_start, 2),
        "cache": str(plan.cache),
    }


featurize_task = stage_task(featurize, "featurize")
