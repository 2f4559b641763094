"""Plain helpers shared by the tests (imported explicitly; the fixtures stay in conftest.py)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from graft.params import Params, parse_params

REPO = Path(__file__).resolve().parents[1]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_params(root: Path, overrides: dict | None = None) -> Params:
    """Params whose every path lives under ``root``, with the tiny random backbone (fast)."""
    raw = {
        "data": {"root": str(root / "raw"), "out_dir": str(root / "data")},
        # taps: the plain features keep most tests about featurize mechanics, not the auto-mode taps (own tests)
        "featurize": {
            "backbone": "tiny_cnn",
            "cache_dir": str(root / "cache"),
            "out": str(root / "data/features.parquet"),
            "batch_size": 8,
            "taps": ["last"],
        },
        "train": {"model_dir": str(root / "models"), "mode": "head"},
        "evaluate": {
            "metrics_dir": str(root / "metrics"),
            "plots_dir": str(root / "plots"),
            "report": str(root / "reports/report.md"),
        },
        "export": {"out": str(root / "models/model.onnx")},
        "retrain": {"models_dir": str(root / "models"), "history": str(root / "models/history.parquet")},
    }
    return parse_params(_merge(raw, overrides or {}))


def class_image(label_index: int, i: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A small RGB image whose colour and stripe direction depend on the class, with per-image noise."""
    rng = np.random.default_rng(1000 * label_index + i)
    w, h = size
    base = np.array([[200, 40, 40], [40, 180, 60], [40, 60, 200], [200, 200, 40]][label_index % 4], np.float32)
    arr = np.tile(base, (h, w, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx if label_index % 2 else yy) // 4) % 2
    arr = arr * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_tree(
    root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 12, fmt: str = "PNG"
) -> list[Path]:
    """Write ``per_class`` generated images into ``root/<class>/``; return their paths."""
    paths = []
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = root / c / f"{c}-{i:03d}.{ext}"
            class_image(ci, i).save(p, format=fmt)
            paths.append(p)
    return paths


def run_stages(params: Params, *stages):
    """Run stage functions (ingest, featurize, ...) in order on one torch thread; return the last result."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [stage(params) for stage in stages][-1]
    finally:
        torch.set_num_threads(threads)


def load_bench(name: str) -> ModuleType:
    """The benchmark script ``bench/<name>.py`` as a module (bench/ is scripts, not a package). bench/ goes on
    ``sys.path`` (last, as running a script there would put it first) for the modules a script imports beside it."""
    if str(REPO / "bench") not in sys.path:
        sys.path.append(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_seven_bit_weights(proto) -> None:
    """Every int8 weight of a quantized graph lies in [-64, 64] (``reduce_range``): uint8 x int8 pairs then sum
    below 32,767 in the 16-bit ``vpmaddubsw`` of CPUs without VNNI (255 x 64 x 2 = 32,640), so nothing saturates."""
    from onnx import TensorProto, numpy_helper

    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == TensorProto.INT8]
    weights = [w for w in weights if w.size > 1]  # per-tensor zero points are single int8 zeros
    assert weights, "no int8 weights in the graph"
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
