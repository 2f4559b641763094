"""Fault rows 16 and 17: feature-cache schema drift, and a changed backbone or preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from graft import GraftError
from graft.backbones import build_backbone
from graft.cache import load_feature_table
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from tests.faults.helpers import params_for
from tests.helpers import write_tree


@pytest.fixture
def featurized(ws: Path):
    """2 x 10 images ingested and featurized once; returns the workspace, params and the cache folder."""
    write_tree(ws / "raw", per_class=10)
    params = params_for(ws)
    ingest(params)
    summary = featurize(params)
    return ws, params, Path(summary["cache"])


def _foreign_part(cache: Path, dim: int, value_type: pa.DataType) -> Path:
    """A part with the right key column but another feature width or dtype (an older or foreign writer)."""
    path = cache / "part-00000000T000000-foreign.parquet"
    table = pa.table(
        {
            "sha256": pa.array(["f" * 64], pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(dim), value_type), dim),
        }
    )
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("dim", "value_type", "shown"),
    [
        (16, pa.float32(), "fixed_size_list<element: float>[16]"),
        (32, pa.float64(), "fixed_size_list<element: double>[32]"),
    ],
    ids=["dimension", "dtype"],
)
def test_feature_dimension_or_dtype_drift_is_detected_by_schema(
    featurized, dim: int, value_type: pa.DataType, shown: str
) -> None:
    """A part of another width or dtype in the cache stops featurize naming the file; nothing is mixed or replaced."""
    ws, params, cache = featurized
    before = Path(params.featurize.out).read_bytes()
    bad = _foreign_part(cache, dim, value_type)

    with pytest.raises(GraftError) as info:
        featurize(params)

    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert f"feature cache part {bad} has schema" in msg and shown in msg and "delete it and rerun" in msg
    assert Path(params.featurize.out).read_bytes() == before


def test_unreadable_part_is_named(featurized) -> None:
    """A part whose footer is garbage is named as unreadable, with the fix."""
    ws, params, cache = featurized
    bad = cache / "part-00000000T000000-garbage.parquet"
    bad.write_bytes(b"PAR1 not really parquet")

    with pytest.raises(GraftError, match=rf"feature cache part {bad} is unreadable .*delete it and rerun"):
        featurize(params)


@pytest.mark.parametrize("change", [{"featurize": {"image_size": 48}}, "weights"], ids=["preprocessing", "weights"])
def test_changed_backbone_or_preprocessing_gets_a_new_fingerprint(featurized, tmp_path: Path, change) -> None:
    """A new input size or new weights is a new cache folder: every image is recomputed, nothing stale is reused."""
    ws, params, cache = featurized
    old_feats, old_meta = load_feature_table(params.featurize.out)
    if change == "weights":
        net = build_backbone("tiny_cnn").model.body
        with torch.no_grad():
            next(net.parameters()).mul_(1.5)
        torch.save(net.state_dict(), tmp_path / "tiny.pt")
        change = {"featurize": {"weights": str(tmp_path / "tiny.pt")}}
    changed = params_for(ws, change)

    summary = featurize(changed)

    assert (summary["computed"], summary["from_cache"]) == (20, 0)
    assert summary["fingerprint"] != old_meta["graft.fingerprint"]
    assert Path(summary["cache"]) != cache and sorted(p.name for p in cache.parent.iterdir()) == sorted(
        [cache.name, Path(summary["cache"]).name]
    )
    new_feats, new_meta = load_feature_table(changed.featurize.out)
    assert new_meta["graft.fingerprint"] == summary["fingerprint"]
    assert new_feats.keys() == old_feats.keys()
    assert all(not np.allclose(new_feats[k], old_feats[k]) for k in new_feats)


def test_cache_folder_of_another_config_is_refused(featurized) -> None:
    """A cache folder whose meta.json describes another config (copied or hand-edited) is not reused."""
    ws, params, cache = featurized
    meta = cache / "meta.json"
    meta.write_text(meta.read_text().replace('"crop": 32', '"crop": 31'))

    with pytest.raises(GraftError, match=f"feature cache {cache} was made by a different backbone config; remove it"):
        featurize(params)
