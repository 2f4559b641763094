"""Featurize engines: run a frozen backbone over preprocessed batches, with onnxruntime or torch.

An engine is a callable ``float32 [N, 3, H, W] in [0, 1] -> float32 [N, D]`` plus ``streams``, the
number of batches it should be given at once. Both engines compute the same features within
tolerance, so the feature cache key (the backbone fingerprint) does not depend on the engine.

* ``onnxruntime`` (the default on CPU, :mod:`graft.onnxengine`): the backbone exported once per
  fingerprint to ``<cache folder>/backbone.onnx``, checked against torch, reused by later runs.
* ``torch`` (the default on CUDA): ``inference_mode``, channels_last, fp16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm.auto import tqdm

from graft import GraftError
from graft.cacheparts import PartWriter
from graft.images import Preprocess, prefetch_map
from graft.onnxengine import ort_engine
from graft.sources import decoded_batches

if TYPE_CHECKING:
    from graft.backbones import Backbone
    from graft.cache import CachePlan
    from graft.params import FeaturizeParams

log = logging.getLogger("graft.engine")


class Engine(Protocol):
    """What featurize needs from an engine."""

    name: str
    streams: int  # batches worth running at the same time (one per worker thread)

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def resolve_engine(name: str) -> str:
    """``auto`` becomes ``torch`` when CUDA is available and ``onnxruntime`` otherwise."""
    if name != "auto":
        return name
    import torch

    return "torch" if torch.cuda.is_available() else "onnxruntime"


# --- torch


class TorchEngine:
    """The torch model itself: inference_mode, channels_last, fp16 autocast on CUDA."""

    name = "torch"
    streams = 1  # torch parallelises inside one call (intra-op threads or the GPU)

    def __init__(self, model, threads: int = 0, amp: bool = True):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.amp = amp and self.device.type == "cuda"  # CPU autocast (bf16) would leave the 1e-4 tolerance
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            out = self.model(x.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy()


# --- running an engine over images into the cache


def feature_batches(
    engine: Engine, items: list[tuple[str, str]], pp: Preprocess, batch_size: int, workers: int
) -> Generator[tuple[list[str], np.ndarray], None, None]:
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


def compute_features(
    engine: Engine,
    pp: Preprocess,
    dim: int,
    items: list[tuple[str, str]],
    cache: Path,
    batch_size: int,
    workers: int,
    part_rows: int,
    desc: str = "featurize",
) -> int:
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


# --- the engine a featurize run asks for


def make_engine(
    fp: FeaturizeParams,
    cache: Path,
    description: dict,
    backbone: Callable[[], Backbone],
    calibration: list[tuple[str, str]] | None = None,
) -> Engine:
    """The engine ``fp`` configures for the backbone ``description``; ``backbone`` is built only if needed.

    With ``fp.precision: int8`` the onnxruntime graph is statically quantized the first time, on the first
    ``fp.calibration_images`` of the ``calibration`` (sha256, path) items in content-hash order (a random
    sample, reproducible), then kept in the cache folder, so every later image goes through the same graph.
    """
    import json

    from graft.backbones import fingerprint_of

    if fp.precision == "fp32" and resolve_engine(fp.engine) == "torch":
        return TorchEngine(backbone().model, fp.threads, fp.amp)
    meta = {
        "graft.kind": "backbone",
        "graft.backbone": description["name"],
        "graft.describe": json.dumps(description, sort_keys=True),
    }
    quantize = None
    if fp.precision == "int8":
        from graft.cache import preprocess_of
        from graft.quantize import CalibrationReader

        pp = preprocess_of(description)

        def quantize() -> CalibrationReader:
            if not calibration:
                raise GraftError("featurize.precision int8 needs images to calibrate on: none to featurize")
            chosen = sorted(calibration)[: fp.calibration_images]
            return CalibrationReader([Path(p) for _, p in chosen], pp)

    return ort_engine(
        cache,
        fingerprint_of(description),
        lambda: backbone().model,
        description["crop"],
        meta,
        fp.threads,
        fp.streams,
        quantize,
    )


def fill_cache(fp: FeaturizeParams, plan: CachePlan, root: str | Path) -> tuple[str | None, int, float]:
    """Compute the features of ``plan.todo`` (paths relative to ``root``) into ``plan.cache``; an int8 engine
    calibrates on those images. Returns (the engine's name or None when nothing was missing, images computed,
    seconds spent computing them)."""
    if not plan.todo:
        return None, 0, 0.0
    todo = [(sha, str(Path(root) / path)) for sha, path in plan.todo]
    engine = make_engine(fp, plan.cache, plan.description, plan.backbone, todo)
    t0 = time.perf_counter()
    computed = compute_features(
        engine,
        plan.preprocess,
        plan.dim,
        todo,
        plan.cache,
        fp.batch_size,
        fp.workers,
        fp.part_rows,
        desc=f"featurize {plan.name}",
    )
    return engine.name, computed, time.perf_counter() - t0
