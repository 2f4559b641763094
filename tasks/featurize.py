"""Featurize: run the frozen backbone over every image not yet in the content-addressed cache.

Cache layout (shared by all runs and all checkouts that point at the same ``cache_dir``)::

    <cache_dir>/<backbone>-<fingerprint>/meta.json        what the fingerprint stands for
    <cache_dir>/<backbone>-<fingerprint>/part-*.parquet   sha256: string, feature: float32[d]

Parts are written atomically as they fill, so a killed run keeps its finished parts and a rerun
computes only the rest. Readers check every part's schema and drop duplicate keys (two runs racing
on one image write identical rows).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from graft import GraftError
from graft.atomic import write_json, write_parquet
from graft.backbones import Backbone, build_backbone
from graft.images import BadImage, Preprocess, load_rgb, prefetch_map, preprocess
from graft.params import Params
from tasks import stage_task

log = logging.getLogger("graft.featurize")


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema([("sha256", pa.string()), ("feature", pa.list_(pa.float32(), dim))])


def cache_dir_for(root: str | Path, bb: Backbone) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in bb.name)
    return Path(root) / f"{safe}-{bb.fingerprint}"


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


def open_cache(cache: Path, bb: Backbone) -> None:
    """Create the cache folder or check that its meta.json matches this backbone."""
    meta = cache / "meta.json"
    if meta.exists():
        import json

        found = json.loads(meta.read_text())
        if found != bb.describe():
            raise GraftError(f"feature cache {cache} was made by a different backbone config; remove it")
    else:
        write_json(meta, bb.describe())


def cached_keys(cache: Path, dim: int) -> set[str]:
    keys: set[str] = set()
    for p in _parts(cache, dim):
        keys.update(pq.read_table(p, columns=["sha256"]).column(0).to_pylist())
    return keys


def read_features(cache: Path, dim: int, shas: Iterable[str]) -> pa.Table:
    """Features for ``shas`` from the cache (one row per key); raise if any is missing."""
    wanted = pa.array(sorted(set(shas)), pa.string())
    tables = [t.filter(pc.is_in(t["sha256"], wanted)) for t in (pq.read_table(p) for p in _parts(cache, dim))]
    table = pa.concat_tables(tables) if tables else feature_schema(dim).empty_table()
    _, first = np.unique(table["sha256"].to_numpy(zero_copy_only=False), return_index=True)
    table = table.take(pa.array(first))
    if table.num_rows != len(wanted):
        raise GraftError(f"{len(wanted) - table.num_rows} image(s) missing from feature cache {cache}; rerun featurize")
    return table


def _decode(chunk: list[tuple[str, str]], pp: Preprocess) -> tuple[list[str], np.ndarray]:
    shas, arrays = [], []
    for sha, path in chunk:
        try:
            data = Path(path).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise GraftError(f"{path} changed since ingest (content hash differs); rerun ingest")
            arrays.append(preprocess(load_rgb(data, min_side=pp.resize)[0], pp))
        except (OSError, BadImage) as exc:
            raise GraftError(f"{path}: cannot read for featurize ({exc}); rerun ingest") from None
        shas.append(sha)
    return shas, np.stack(arrays)


def decoded_batches(items: list[tuple[str, str]], pp: Preprocess, batch_size: int, workers: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decode batches in a thread pool, ``workers`` batches ahead of the consumer (decode overlaps inference)."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    yield from prefetch_map(lambda chunk: _decode(chunk, pp), chunks, workers)


def compute_features(bb: Backbone, items: list[tuple[str, str]], cache: Path, batch_size: int,
                     workers: int, part_rows: int) -> int:
    """Run ``bb`` over ``items`` (sha256, path) and append the features to ``cache`` in parts."""
    model = bb.model.to(memory_format=torch.channels_last)
    buf_sha: list[str] = []
    buf_feat: list[np.ndarray] = []

    def flush() -> None:
        if buf_sha:
            table = pa.table({"sha256": pa.array(buf_sha, pa.string()),
                              "feature": pa.FixedSizeListArray.from_arrays(np.concatenate(buf_feat).ravel(), bb.feature_dim)},
                             schema=feature_schema(bb.feature_dim))
            write_parquet(cache / f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet", table)
            buf_sha.clear()
            buf_feat.clear()

    done = 0
    with tqdm(total=len(items), unit="img", desc=f"featurize {bb.name}", disable=None) as bar, torch.inference_mode():
        for shas, x in decoded_batches(items, bb.preprocess, batch_size, workers):
            feats = model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            buf_sha.extend(shas)
            buf_feat.append(feats.float().numpy().astype(np.float32, copy=False))
            done += len(shas)
            bar.update(len(shas))
            if len(buf_sha) >= part_rows:
                flush()
        flush()
    return done


def featurize(params: Params, backbone: Backbone | None = None) -> dict:
    """Fill the cache for every image in the manifest, then write this manifest's feature table."""
    fp = params.featurize
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    bb = backbone or build_backbone(fp.backbone, fp.weights, fp.image_size)
    if fp.threads:
        torch.set_num_threads(fp.threads)
    cache = cache_dir_for(fp.cache_dir, bb)
    open_cache(cache, bb)
    root = Path(params.data.root)
    unique = manifest.drop_duplicates("sha256")
    have = cached_keys(cache, bb.feature_dim)
    todo = [(r.sha256, str(root / r.path)) for r in unique.itertuples() if r.sha256 not in have]
    t0 = time.perf_counter()
    computed = compute_features(bb, todo, cache, fp.batch_size, fp.workers, fp.part_rows) if todo else 0
    seconds = time.perf_counter() - t0
    table = read_features(cache, bb.feature_dim, unique["sha256"])
    meta = {b"graft.backbone": bb.name.encode(), b"graft.fingerprint": bb.fingerprint.encode()}
    write_parquet(fp.out, table.replace_schema_metadata(meta))
    return {"backbone": bb.name, "fingerprint": bb.fingerprint, "images": len(unique), "computed": computed,
            "from_cache": len(unique) - computed, "seconds": round(seconds, 2),
            "img_per_s": round(computed / seconds, 1) if computed else None, "cache": str(cache)}


def load_feature_table(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a features.parquet into {sha256: vector} plus its backbone metadata."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"graft.")}
    dim = table.schema.field("feature").type.list_size
    feats = table["feature"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table["sha256"].to_pylist(), feats)), meta


featurize_task = stage_task(featurize, "featurize")
