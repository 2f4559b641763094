"""A cached ``backbone.onnx`` whose weights changed after export is detected by its graph hash
(features were silently off by 0.37 before), and an older export without a hash is re-exported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graft import GraftError
from graft.tasks.featurize import featurize
from tests.faults.helpers import params_for, run_ingest
from tests.helpers import class_image, write_tree


@pytest.fixture
def featurized(ws: Path) -> tuple[Path, Path]:
    """Featurized once with the onnxruntime engine; then two new images that need the engine again."""
    write_tree(ws / "raw", per_class=8)
    run_ingest(ws)
    cache = Path(featurize(params_for(ws, {"featurize": {"engine": "onnxruntime"}}))["cache"])
    for i in (50, 51):
        class_image(0, i).save(ws / f"raw/cat/new-{i}.png")
    run_ingest(ws)
    return ws, cache / "backbone.onnx"


def test_changed_backbone_weights_are_refused(featurized) -> None:
    ws, path = featurized
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init) + 0.05
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(proto, str(path))  # metadata (fingerprint and all) untouched: only the weights differ

    with pytest.raises(GraftError) as info:
        featurize(params_for(ws, {"featurize": {"engine": "onnxruntime"}}))

    assert str(info.value) == f"{path} changed since it was exported (graph sha256 differs): delete it and rerun"


def test_a_backbone_exported_without_a_hash_is_exported_again(featurized) -> None:
    ws, path = featurized
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != "graft.graph_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(path))

    summary = featurize(params_for(ws, {"featurize": {"engine": "onnxruntime"}}))

    assert summary["computed"] == 2
    assert "graft.graph_sha256" in {p.key for p in onnx.load(str(path)).metadata_props}
