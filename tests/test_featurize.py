"""Tests for tasks.featurize: the content-addressed feature cache computes each image once."""

from __future__ import annotations

import os
import shutil
import threading
from unittest import mock
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tasks.featurize
from graft import GraftError
from graft.backbones import build_backbone
from graft.images import load_rgb, preprocess
from tasks.featurize import cache_dir_for, feature_schema, featurize, load_feature_table, read_features
from tasks.ingest import ingest
from tests.conftest import class_image, make_params, write_tree

DIM = 32  # tiny_cnn feature width


class CountingBackbone:
    """A tiny_cnn backbone that counts the images its featurize engine runs on (either engine)."""

    def __init__(self, image_size: int | None = None):
        self.bb = build_backbone("tiny_cnn", image_size=image_size)
        self.seen = 0
        self._lock = threading.Lock()

    def _counted(self, engine):
        """Wrap ``engine`` so each batch adds its size to the counter (streams call it from threads)."""
        owner = self

        class Counted:
            name, streams = engine.name, engine.streams

            def __call__(self, x):
                with owner._lock:
                    owner.seen += len(x)
                return engine(x)

        return Counted()

    def run(self, params) -> dict:
        """Featurize with this backbone; return the summary after checking it agrees with the counter."""
        before = self.seen
        real = tasks.featurize.make_engine
        with mock.patch.object(tasks.featurize, "make_engine", lambda *a, **k: self._counted(real(*a, **k))):
            summary = featurize(params, backbone=self.bb)
        assert summary["computed"] == self.seen - before
        return summary


def _unique(params) -> set[str]:
    """The distinct content hashes in the current manifest."""
    return set(pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")["sha256"])


def _parts(cache: Path) -> list[Path]:
    """The Parquet parts of a cache folder, sorted."""
    return sorted(cache.glob("part-*.parquet"))


@pytest.fixture(params=["onnxruntime", "torch"])
def setup(ws: Path, request: pytest.FixtureRequest):
    """A workspace with 2 x 10 generated images, ingested, and its params (once per engine)."""
    write_tree(ws / "raw", ("cat", "dog"), per_class=10)
    params = make_params(ws, {"featurize": {"engine": request.param}})
    ingest(params)
    return ws, params


def test_second_run_computes_nothing(setup) -> None:
    """The first run computes every unique image; a second run runs zero forward passes."""
    ws, params = setup
    counter = CountingBackbone()
    first = counter.run(params)
    n = len(_unique(params))
    assert n == 20
    assert counter.seen == n
    assert (first["computed"], first["from_cache"], first["images"]) == (n, 0, n)
    second = counter.run(params)
    assert counter.seen == n
    assert (second["computed"], second["from_cache"]) == (0, n)


def test_new_images_cost_one_pass_each(setup) -> None:
    """After adding 3 images and re-ingesting, exactly those 3 are computed."""
    ws, params = setup
    counter = CountingBackbone()
    counter.run(params)
    old = _unique(params)
    for i in range(3):
        class_image(0, 100 + i).save(ws / "raw" / "cat" / f"new-{i}.png")
    ingest(params)
    seen = counter.seen
    summary = counter.run(params)
    assert counter.seen - seen == 3
    assert summary["computed"] == 3
    assert summary["from_cache"] == len(old)
    assert len(_unique(params) - old) == 3


def test_duplicate_bytes_computed_once(setup) -> None:
    """Identical files under two names cost one forward pass and one feature row."""
    ws, params = setup
    src = ws / "raw" / "cat" / "cat-000.png"
    shutil.copy(src, ws / "raw" / "cat" / "copy-of-cat-000.png")
    shutil.copy(src, ws / "raw" / "cat" / "another-copy.png")
    ingest(params)
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    assert len(manifest) == 22
    counter = CountingBackbone()
    counter.run(params)
    assert counter.seen == manifest["sha256"].nunique() == 20
    cache = cache_dir_for(params.featurize.cache_dir, counter.bb)
    keys = pa.concat_tables([pq.read_table(p) for p in _parts(cache)])["sha256"].to_pylist()
    assert len(keys) == len(set(keys)) == 20


def test_cache_part_schema(setup) -> None:
    """Every cache part is sha256: string, feature: fixed_size_list<float32>[32]."""
    ws, params = setup
    summary = featurize(params)
    parts = _parts(Path(summary["cache"]))
    assert parts
    for p in parts:
        schema = pq.read_schema(p).remove_metadata()
        assert schema.names == ["sha256", "feature"]
        assert schema.field("sha256").type == pa.string()
        assert schema.field("feature").type == pa.list_(pa.float32(), DIM)
        assert schema.equals(feature_schema(DIM))


def test_small_part_rows_split_the_cache(setup) -> None:
    """part_rows bounds the rows per part file; the union is still one row per image."""
    ws, params = setup
    params = make_params(ws, {"featurize": {"part_rows": 6}})
    summary = featurize(params)
    parts = _parts(Path(summary["cache"]))
    rows = [pq.read_metadata(p).num_rows for p in parts]
    assert len(parts) >= 2
    assert all(r <= 6 + params.featurize.batch_size - 1 for r in rows)  # flushed after the batch that fills it
    assert sum(rows) == 20


def test_cached_features_match_direct_forward(setup) -> None:
    """A cached vector equals the backbone applied to the preprocessed image."""
    ws, params = setup
    featurize(params)
    feats, meta = load_feature_table(params.featurize.out)
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    bb = build_backbone("tiny_cnn")
    row = manifest.iloc[3]
    x = torch.from_numpy(preprocess(load_rgb(Path(params.data.root) / row["path"])[0], bb.preprocess))[None]
    with torch.no_grad():
        direct = bb.model(x)[0].numpy()
    np.testing.assert_allclose(feats[row["sha256"]], direct, rtol=1e-5, atol=1e-5)
    assert meta == {"graft.backbone": "tiny_cnn", "graft.fingerprint": bb.fingerprint}


def test_foreign_part_with_other_dim_is_rejected(setup) -> None:
    """A part with a different feature width in the cache folder fails naming the part."""
    ws, params = setup
    summary = featurize(params)
    cache = Path(summary["cache"])
    foreign = cache / "part-foreign.parquet"
    table = pa.table({"sha256": pa.array(["0" * 64], pa.string()),
                      "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(16, np.float32)), 16)})
    pq.write_table(table, foreign)
    with pytest.raises(GraftError) as info:
        featurize(params)
    msg = str(info.value)
    assert str(foreign) in msg
    assert len(msg.splitlines()) == 1


def test_foreign_part_with_other_dtype_is_rejected(setup) -> None:
    """A part storing float64 features is rejected, never mixed in."""
    ws, params = setup
    summary = featurize(params)
    foreign = Path(summary["cache"]) / "part-float64.parquet"
    table = pa.table({"sha256": pa.array(["1" * 64], pa.string()),
                      "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(DIM, np.float64)), DIM)})
    pq.write_table(table, foreign)
    with pytest.raises(GraftError, match="part-float64.parquet"):
        featurize(params)


def test_duplicate_part_reads_one_row_per_key(setup) -> None:
    """A part written twice (two racing runs) still reads back as one row per key."""
    ws, params = setup
    summary = featurize(params)
    cache = Path(summary["cache"])
    parts = _parts(cache)
    shutil.copy(parts[0], cache / "part-zzzz-racing-copy.parquet")
    shas = _unique(params)
    table = read_features(cache, DIM, shas)
    keys = table["sha256"].to_pylist()
    assert len(keys) == len(set(keys)) == len(shas)
    assert set(keys) == shas
    again = featurize(params)
    assert again["computed"] == 0
    out = pq.read_table(params.featurize.out)
    assert out.num_rows == len(shas)


def test_read_features_reports_missing_keys(setup) -> None:
    """Asking the cache for an image it lacks is an error with the count."""
    ws, params = setup
    summary = featurize(params)
    with pytest.raises(GraftError, match=r"^1 image\(s\) missing"):
        read_features(Path(summary["cache"]), DIM, [*_unique(params), "f" * 64])


def test_changed_preprocessing_gets_new_cache(setup) -> None:
    """An image_size override is a new fingerprint, a new cache folder, and recomputes everything."""
    ws, params = setup
    base = CountingBackbone()
    first = base.run(params)
    bigger = CountingBackbone(image_size=48)
    params48 = make_params(ws, {"featurize": {"image_size": 48}})
    second = bigger.run(params48)
    assert second["fingerprint"] != first["fingerprint"]
    assert second["cache"] != first["cache"]
    assert second["computed"] == bigger.seen == 20
    assert sorted(p.name for p in Path(params.featurize.cache_dir).iterdir()) == sorted(
        [Path(first["cache"]).name, Path(second["cache"]).name])


def test_features_parquet_one_row_per_unique_image(setup) -> None:
    """features.parquet has exactly the manifest's unique hashes, each once, as float32[32]."""
    ws, params = setup
    shutil.copy(ws / "raw" / "dog" / "dog-001.png", ws / "raw" / "dog" / "dup.png")
    ingest(params)
    featurize(params)
    table = pq.read_table(params.featurize.out)
    keys = table["sha256"].to_pylist()
    assert len(keys) == len(set(keys))
    assert set(keys) == _unique(params)
    assert table.schema.field("feature").type == pa.list_(pa.float32(), DIM)


def test_no_tmp_files_left(setup) -> None:
    """After a run no temporary file remains in the cache or beside features.parquet."""
    ws, params = setup
    featurize(params)
    featurize(params)
    leftovers = [f for d in (params.featurize.cache_dir, Path(params.featurize.out).parent)
                 for _, _, files in os.walk(d) for f in files if f.endswith(".tmp")]
    assert leftovers == []
    assert (Path(featurize(params)["cache"]) / "meta.json").is_file()


def test_file_changed_since_ingest(setup) -> None:
    """A file rewritten after ingest fails with 'changed since ingest' naming it."""
    ws, params = setup
    target = ws / "raw" / "dog" / "dog-004.png"
    class_image(1, 999).save(target)
    with pytest.raises(GraftError) as info:
        featurize(params)
    assert "changed since ingest" in str(info.value)
    assert "dog-004.png" in str(info.value)


def test_meta_mismatch_is_rejected(setup) -> None:
    """A cache folder whose meta.json describes another config is refused."""
    ws, params = setup
    summary = featurize(params)
    meta = Path(summary["cache"]) / "meta.json"
    meta.write_text(meta.read_text().replace('"pool": "avg"', '"pool": "max"'))
    with pytest.raises(GraftError, match="different backbone config"):
        featurize(params)
