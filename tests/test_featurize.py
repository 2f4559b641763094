"""Tests for tasks.featurize: the content-addressed feature cache computes each image once."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import graft.engine
from graft import GraftError
from graft.backbones import build_backbone
from graft.cache import cache_dir_for, cached_keys, feature_schema, load_feature_table, read_features
from graft.images import load_rgb, preprocess
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from tests.helpers import assert_seven_bit_weights, class_image, make_params, write_tree

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
        real = graft.engine.make_engine
        with mock.patch.object(graft.engine, "make_engine", lambda *a, **k: self._counted(real(*a, **k))):
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
    cache = cache_dir_for(params.featurize.cache_dir, counter.bb.name, counter.bb.fingerprint)
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
    assert meta == {
        "graft.backbone": "tiny_cnn",
        "graft.fingerprint": bb.fingerprint,
        "graft.description": json.dumps(bb.describe(), sort_keys=True),
    }


def test_foreign_part_with_other_dim_is_rejected(setup) -> None:
    """A part with a different feature width in the cache folder fails naming the part."""
    ws, params = setup
    summary = featurize(params)
    cache = Path(summary["cache"])
    foreign = cache / "part-foreign.parquet"
    table = pa.table(
        {
            "sha256": pa.array(["0" * 64], pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(16, np.float32)), 16),
        }
    )
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
    table = pa.table(
        {
            "sha256": pa.array(["1" * 64], pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(DIM, np.float64)), DIM),
        }
    )
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
        [Path(first["cache"]).name, Path(second["cache"]).name]
    )


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
    leftovers = [
        f
        for d in (params.featurize.cache_dir, Path(params.featurize.out).parent)
        for _, _, files in os.walk(d)
        for f in files
        if f.endswith(".tmp")
    ]
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


def _failing_engine(after_batches: int):
    """A make_engine replacement whose engine raises on batch number ``after_batches + 1``."""
    real = graft.engine.make_engine

    def make(*args, **kwargs):
        engine, calls = real(*args, **kwargs), [0]

        class Failing:
            name, streams = engine.name, 1  # one stream: the failure point is deterministic

            def __call__(self, x):
                calls[0] += 1
                if calls[0] > after_batches:
                    raise RuntimeError("simulated crash")
                return engine(x)

        return Failing()

    return make


def _cached_rows(cache: Path) -> list[str]:
    """Every sha256 row in the cache's parts (duplicates included)."""
    return [k for p in _parts(cache) for k in pq.read_table(p, columns=["sha256"]).column(0).to_pylist()]


def test_interrupted_run_keeps_what_was_done(ws: Path) -> None:
    """A run that fails after 5 batches keeps their rows (flushed parts + the rest on the way out);
    the rerun computes exactly the remainder."""
    write_tree(ws / "raw", ("cat", "dog"), per_class=10)
    params = make_params(ws, {"featurize": {"batch_size": 2, "part_rows": 4}})
    ingest(params)
    counter = CountingBackbone()
    with (
        mock.patch.object(graft.engine, "make_engine", _failing_engine(5)),
        pytest.raises(RuntimeError, match="simulated crash"),
    ):
        featurize(params, backbone=counter.bb)
    cache = cache_dir_for(params.featurize.cache_dir, counter.bb.name, counter.bb.fingerprint)
    kept = _cached_rows(cache)
    assert len(kept) == len(set(kept)) == 10  # 5 batches of 2, none lost, none twice
    assert len(_parts(cache)) == 3  # two full parts of 4, then the 2 rows buffered at the crash
    summary = counter.run(params)
    assert summary["computed"] == counter.seen == 10
    assert summary["from_cache"] == 10
    rows = _cached_rows(cache)
    assert len(rows) == len(set(rows)) == 20


def test_cache_hit_starts_no_engine(setup) -> None:
    """When every image is cached, no engine (and no ONNX export) is created at all."""
    ws, params = setup
    featurize(params)
    with mock.patch.object(graft.engine, "make_engine", side_effect=AssertionError("engine started")):
        summary = featurize(params)
    assert summary["computed"] == 0 and summary["engine"] is None


def test_feature_table_streams_part_by_part(setup) -> None:
    """features.parquet is written one row group per cache part holding wanted rows; others are skipped."""
    ws, params = setup
    params = make_params(ws, {"featurize": {"engine": params.featurize.engine, "part_rows": 6}})
    summary = featurize(params)
    cache = Path(summary["cache"])
    foreign = pa.table(
        {
            "sha256": pa.array(["e" * 64], pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(DIM, np.float32)), DIM),
        },
        schema=feature_schema(DIM),
    )
    pq.write_table(foreign, cache / "part-0-unrelated.parquet")
    featurize(params)
    meta = pq.read_metadata(params.featurize.out)
    assert meta.num_rows == 20
    assert meta.num_row_groups == len(_parts(cache)) - 1  # every part but the unrelated one


_KILLABLE = """
import sys, time
import graft.engine as engine_module
import graft.tasks.featurize as tf
from graft.params import parse_params
import json
params = parse_params(json.loads(sys.argv[1]))
real = engine_module.make_engine

def slow(*a, **k):
    engine = real(*a, **k)
    class Slow:
        name, streams = engine.name, 1
        def __call__(self, x):
            time.sleep(0.3)
            return engine(x)
    return Slow()

engine_module.make_engine = slow
tf.featurize(params)
"""


@pytest.mark.slow
def test_sigkill_midway_then_rerun_computes_the_rest(ws: Path) -> None:
    """SIGKILL a featurize subprocess after its first part lands; the rerun computes only the rest."""
    import json
    import signal
    import subprocess
    import sys
    import time

    write_tree(ws / "raw", ("cat", "dog"), per_class=10)
    overrides = {"featurize": {"batch_size": 2, "part_rows": 4}}
    params = make_params(ws, overrides)
    ingest(params)
    cache = cache_dir_for(params.featurize.cache_dir, "tiny_cnn", build_backbone("tiny_cnn").fingerprint)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, json.dumps(params.model_dump(mode="json"))],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (cache.is_dir() and _parts(cache)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kept = _cached_rows(cache)
    assert 4 <= len(kept) < 20 and len(kept) == len(set(kept))
    counter = CountingBackbone()
    summary = counter.run(params)
    assert summary["computed"] == counter.seen == 20 - len(kept)
    rows = _cached_rows(cache)
    assert len(rows) == len(set(rows)) == 20


def test_cached_keys_among_the_manifest(setup) -> None:
    """cached_keys(among=...) returns only the manifest's keys, not the rest of a shared cache."""
    ws, params = setup
    summary = featurize(params)
    cache = Path(summary["cache"])
    other = pa.table(
        {
            "sha256": pa.array(["d" * 64], pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(DIM, np.float32)), DIM),
        },
        schema=feature_schema(DIM),
    )
    pq.write_table(other, cache / "part-other-project.parquet")
    shas = _unique(params)
    assert cached_keys(cache, DIM) == shas | {"d" * 64}
    assert cached_keys(cache, DIM, among=list(shas)[:5] + ["0" * 64]) == set(list(shas)[:5])


def test_a_transient_read_error_stays_retryable_and_a_rerun_completes(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO while reading an image surfaces as OSError (Prefect retries it), not as a bad-input GraftError."""
    import errno
    from types import SimpleNamespace

    from graft.tasks import retry_transient as _transient

    ws, params = setup
    victim = sorted((ws / "raw/dog").iterdir())[3]
    import graft.sources

    real = graft.sources.read_regular

    def flaky(path, *args) -> bytes:
        if Path(path) == victim:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args)

    monkeypatch.setattr(graft.sources, "read_regular", flaky)
    with pytest.raises(OSError) as info:
        featurize(params)
    assert not isinstance(info.value, GraftError) and victim.name in str(info.value)
    state = SimpleNamespace(result=lambda raise_on_failure=False: info.value)
    assert _transient(None, None, state)
    monkeypatch.undo()
    assert featurize(params)["images"] == 20  # the storage is back: the rerun finishes


def test_int8_features_get_their_own_cache_calibrated_once(ws: Path) -> None:
    """featurize.precision int8: a quantized onnxruntime graph (marked int8) in a cache folder of its own, whose
    features stay close to fp32's (same ranking of images by feature), calibrated once: a later run with new
    images reuses the very graph rather than calibrating another."""
    import onnx

    write_tree(ws / "raw", ("cat", "dog", "owl"), per_class=12)
    fp32 = make_params(ws, {"featurize": {"engine": "onnxruntime"}})
    int8 = make_params(ws, {"featurize": {"engine": "onnxruntime", "precision": "int8", "calibration_images": 16}})
    ingest(fp32)
    a, b = featurize(fp32), featurize(int8)
    assert a["fingerprint"] != b["fingerprint"] and a["cache"] != b["cache"] and b["computed"] == 36
    graph = Path(b["cache"]) / "backbone.onnx"
    proto = onnx.load(str(graph))
    assert {p.key: p.value for p in proto.metadata_props}["graft.precision"] == "int8"
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert_seven_bit_weights(proto)

    def features(cache: str) -> np.ndarray:
        table = read_features(Path(cache), DIM, sorted(_unique(fp32))).sort_by("sha256")
        return np.stack(table.column("feature").to_numpy(zero_copy_only=False))

    fa, fb = features(a["cache"]), features(b["cache"])
    assert not np.array_equal(fa, fb)  # really another model
    corr = np.corrcoef(fa.ravel(), fb.ravel())[0, 1]
    assert corr > 0.98, corr
    before = graph.read_bytes()
    class_image(0, 99).save(ws / "raw" / "cat" / "cat-new.png")
    ingest(int8)
    again = featurize(int8)
    assert again["computed"] == 1 and graph.read_bytes() == before


def test_int8_graph_maps_its_outputs_onto_fp32(ws: Path) -> None:
    """The int8 feature graph ends in a per-channel gain and offset fitted on its calibration images
    (:func:`graft.quantize.output_correction`): on the images it was not calibrated on, its features are closer
    to fp32's than the quantized layers' own outputs; the scheme is part of the fingerprint."""
    import onnx
    from onnx import numpy_helper

    write_tree(ws / "raw", ("cat", "dog", "owl"), per_class=12)
    fp32 = make_params(ws, {"featurize": {"engine": "onnxruntime"}})
    int8 = make_params(ws, {"featurize": {"engine": "onnxruntime", "precision": "int8", "calibration_images": 16}})
    ingest(fp32)
    a, b = featurize(fp32), featurize(int8)
    proto = onnx.load(str(Path(b["cache"]) / "backbone.onnx"))
    assert [n.op_type for n in proto.graph.node[-2:]] == ["Mul", "Add"]
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gain, offset = init["features_gain"], init["features_offset"]
    assert gain.shape == offset.shape == (DIM,) and np.all((gain >= 0.5) & (gain <= 2.0))
    assert json.loads((Path(b["cache"]) / "meta.json").read_text())["quantization"].endswith("output correction")
    shas = sorted(_unique(fp32))
    unseen = shas[16:]  # calibration takes the first 16 in content-hash order

    def features(cache: str) -> np.ndarray:
        table = read_features(Path(cache), DIM, unseen).sort_by("sha256")
        return np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float64)

    ref, corrected = features(a["cache"]), features(b["cache"])
    raw = (corrected - offset) / gain  # what the quantized layers put out before the correction
    assert np.mean((corrected - ref) ** 2) < np.mean((raw - ref) ** 2)


def test_int8_needs_onnxruntime_and_the_local_runner(ws: Path) -> None:
    with pytest.raises(GraftError, match="int8 runs on onnxruntime"):
        make_params(ws, {"featurize": {"engine": "torch", "precision": "int8"}})
    with pytest.raises(GraftError, match="runner local"):
        make_params(ws, {"featurize": {"precision": "int8", "runner": "dask"}})
