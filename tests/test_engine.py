"""Tests for graft.engine and graft.onnxengine: onnxruntime and torch give the same features under one cache key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import graft.backbones
import graft.engine
import graft.onnxengine
from graft import GraftError
from graft.backbones import build_backbone, describe_backbone, fingerprint_of
from graft.cache import feature_schema, load_feature_table
from graft.engine import TorchEngine, resolve_engine
from graft.onnxengine import ONNX_FILE, ort_engine, plan_threads
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from tests.helpers import class_image, make_params, write_tree


@pytest.fixture
def setup(ws: Path):
    """A workspace with 2 x 10 generated images, ingested."""
    write_tree(ws / "raw", ("cat", "dog"), per_class=10)
    ingest(make_params(ws))
    return ws


def _params(ws: Path, engine: str, cache: str = "cache", **extra):
    """Params for ``engine`` writing into their own cache folder and feature table."""
    return make_params(
        ws,
        {
            "featurize": {
                "engine": engine,
                "cache_dir": str(ws / cache),
                "out": str(ws / f"data/features-{cache}.parquet"),
                **extra,
            }
        },
    )


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every backbone ONNX export (the real one still runs)."""
    calls: list[Path] = []
    real = graft.onnxengine.export_backbone

    def counted(model, path, size, metadata):
        calls.append(Path(path))
        return real(model, path, size, metadata)

    monkeypatch.setattr(graft.onnxengine, "export_backbone", counted)
    return calls


def test_engines_agree_and_share_the_cache_key(setup: Path) -> None:
    """onnxruntime and torch features match within 1e-4 and land in identically named cache folders."""
    ws = setup
    ort_sum = featurize(_params(ws, "onnxruntime", "cache-ort"))
    torch_sum = featurize(_params(ws, "torch", "cache-torch"))
    assert (ort_sum["engine"], torch_sum["engine"]) == ("onnxruntime", "torch")
    assert ort_sum["fingerprint"] == torch_sum["fingerprint"]
    assert Path(ort_sum["cache"]).name == Path(torch_sum["cache"]).name
    a, _ = load_feature_table(ws / "data/features-cache-ort.parquet")
    b, _ = load_feature_table(ws / "data/features-cache-torch.parquet")
    assert a.keys() == b.keys() and len(a) == 20
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff <= 1e-4


def test_engines_share_one_cache(setup: Path) -> None:
    """A cache filled by one engine is complete for the other: nothing is recomputed."""
    ws = setup
    featurize(_params(ws, "onnxruntime"))
    again = featurize(_params(ws, "torch"))
    assert again["computed"] == 0 and again["engine"] is None


def test_backbone_onnx_exported_once_and_reused(setup: Path, exports: list[Path]) -> None:
    """The first onnxruntime run exports backbone.onnx into the cache folder; later runs reuse it."""
    ws = setup
    first = featurize(_params(ws, "onnxruntime"))
    path = Path(first["cache"]) / ONNX_FILE
    assert exports == [path] and path.is_file()
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["graft.fingerprint"] == first["fingerprint"]
    assert json.loads(meta["graft.describe"])["name"] == "tiny_cnn"
    for i in range(3):
        class_image(1, 300 + i).save(ws / "raw" / "dog" / f"new-{i}.png")
    ingest(make_params(ws))
    second = featurize(_params(ws, "onnxruntime"))
    assert second["computed"] == 3
    assert exports == [path]


def test_drifting_export_is_refused(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export that does not match torch fails with one line and leaves no backbone.onnx behind."""
    ws = setup
    monkeypatch.setattr(graft.onnxengine, "ONNX_TOL", -1.0)  # the real comparison, a tolerance nothing meets
    with pytest.raises(GraftError) as info:
        featurize(_params(ws, "onnxruntime"))
    assert "drifts from torch" in str(info.value) and len(str(info.value).splitlines()) == 1
    cache = next((ws / "cache").iterdir())
    assert not (cache / ONNX_FILE).exists()
    assert [f for f in os.listdir(cache) if f.endswith(".tmp")] == []
    assert list(cache.glob("part-*.parquet")) == []


def test_foreign_backbone_onnx_is_refused(setup: Path, tmp_path: Path) -> None:
    """A backbone.onnx recorded for another fingerprint is refused, naming the file."""
    ws = setup
    summary = featurize(_params(ws, "onnxruntime"))
    path = Path(summary["cache"]) / ONNX_FILE
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "graft.fingerprint":
            p.value = "0" * 16
    onnx.save(proto, str(path))
    class_image(0, 777).save(ws / "raw" / "cat" / "extra.png")
    ingest(make_params(ws))
    with pytest.raises(GraftError, match="backbone.onnx was exported for fingerprint 0000000000000000"):
        featurize(_params(ws, "onnxruntime"))


def test_many_streams_keep_rows_in_order(setup: Path) -> None:
    """With several streams and tiny batches every image still gets its own features."""
    ws = setup
    featurize(_params(ws, "onnxruntime", threads=3, streams=3, batch_size=2))
    many, _ = load_feature_table(ws / "data/features-cache.parquet")
    featurize(_params(ws, "torch", "cache-ref"))
    ref, _ = load_feature_table(ws / "data/features-cache-ref.parquet")
    assert many.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(many[k], ref[k], atol=1e-5)


def test_cache_hit_on_lite0_builds_nothing(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete Lite0 cache is found from the cheap description: no model build, no engine."""
    write_tree(ws / "raw", ("cat", "dog"), per_class=3)
    params = make_params(ws, {"featurize": {"backbone": "efficientnet_lite0"}})
    ingest(params)
    desc = describe_backbone("efficientnet_lite0")
    cache = ws / "cache" / f"efficientnet_lite0-{fingerprint_of(desc)}"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps(desc))
    shas = sorted(set(pd.read_parquet(ws / "data/manifest.parquet")["sha256"]))
    feats = np.random.default_rng(0).random((len(shas), 1280), dtype=np.float32)
    pq.write_table(
        pa.table(
            {"sha256": pa.array(shas, pa.string()), "feature": pa.FixedSizeListArray.from_arrays(feats.ravel(), 1280)},
            schema=feature_schema(1280),
        ),
        cache / "part-0.parquet",
    )

    def refuse(*args, **kwargs):
        raise AssertionError("must not be called on a cache hit")

    monkeypatch.setattr(graft.backbones, "build_backbone", refuse)
    monkeypatch.setattr(graft.engine, "make_engine", refuse)
    summary = featurize(params)
    assert (summary["computed"], summary["from_cache"], summary["engine"]) == (0, len(shas), None)
    got, meta = load_feature_table(params.featurize.out)
    np.testing.assert_array_equal(got[shas[1]], feats[1])
    assert meta["graft.fingerprint"] == fingerprint_of(desc)


@pytest.mark.parametrize(
    ("threads", "streams", "cores", "plan"),
    [
        (0, 0, 2, (2, 1)),  # default on 2 cores: two single-threaded sessions
        (0, 1, 2, (1, 2)),  # one session using both cores
        (4, 2, 2, (2, 2)),
        (2, 8, 2, (2, 1)),  # never more streams than threads
        (0, 0, 1, (1, 1)),
        (0, 0, 16, (4, 4)),  # many cores: at most 4 sessions, threads split inside them
    ],
)
def test_plan_threads(
    threads: int, streams: int, cores: int, plan: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(streams, threads per stream) from featurize.threads and featurize.streams."""
    monkeypatch.setattr(graft.onnxengine, "cpu_cores", lambda: cores)
    assert plan_threads(threads, streams) == plan


def test_auto_engine_follows_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto is torch with CUDA and onnxruntime without; explicit choices stay."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine("auto") == "onnxruntime"
    assert resolve_engine("torch") == "torch"


def test_torch_engine_matches_plain_forward() -> None:
    """channels_last + inference_mode give the plain forward's features."""
    bb = build_backbone("tiny_cnn")
    x = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = bb.model(torch.from_numpy(x)).numpy()
    got = TorchEngine(bb.model)(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.fixture(scope="module")
def lite0():
    """The real EfficientNet-Lite0 backbone (built once)."""
    return build_backbone("efficientnet_lite0")


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [None, 192])
def test_lite0_description_equals_built(lite0, image_size: int | None) -> None:
    """The cheap Lite0 description is exactly the built backbone's (same fingerprint, no model)."""
    built = lite0 if image_size is None else build_backbone("efficientnet_lite0", image_size=image_size)
    assert describe_backbone("efficientnet_lite0", image_size=image_size) == built.describe()
    assert fingerprint_of(built.describe()) == built.fingerprint


@pytest.mark.slow
def test_lite0_onnx_engine_matches_torch(lite0, tmp_path: Path) -> None:
    """Lite0 exported for onnxruntime gives torch's features on a real photo within 1e-4."""
    from PIL import Image
    from skimage import data

    from graft.images import preprocess

    engine = ort_engine(tmp_path, lite0.fingerprint, lambda: lite0.model, 224, {}, threads=2, streams=2)
    x = np.stack([preprocess(Image.fromarray(img), lite0.preprocess) for img in (data.chelsea(), data.coffee())])
    with torch.no_grad():
        ref = lite0.model(torch.from_numpy(x)).numpy()
    got = engine(x)
    assert got.shape == (2, 1280)
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))
