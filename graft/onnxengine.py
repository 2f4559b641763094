"""The onnxruntime featurize engine: the backbone exported once per fingerprint, checked, then reused.

The backbone goes to ``<cache folder>/backbone.onnx``, is checked against torch, and is reused by every
later run, which then needs no torch model at all. On a small CPU the engine runs ``streams``
single-threaded sessions side by side rather than one multi-threaded session: decoder threads then
never stall an operator barrier, and each core alternates decoding and inference on its own.
"""

from __future__ import annotations

import logging
import os
import queue
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graft import GraftError
from graft.atomic import atomic_path
from graft.integrity import WEIGHTS_KEY, graph_sha256, graph_verified

log = logging.getLogger("graft.engine")

ONNX_FILE = "backbone.onnx"
ONNX_OPSET = 17  # the TorchScript exporter's tested opset (Lite0 matched torch within 3e-5)
ONNX_TOL = 1e-4  # max |f_onnx - f_torch|, relative to max(1, max |f_torch|), checked before first use


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


AUTO_STREAMS = 4  # beyond this, split cores inside sessions: each stream holds a batch of activations


def plan_threads(threads: int, streams: int) -> tuple[int, int]:
    """(streams, intra-op threads per stream) from the params; 0 threads = all cores, 0 streams = auto.

    Auto gives one single-threaded session per core up to :data:`AUTO_STREAMS` sessions: on 2
    cores, two sessions that each alternate with the decoders, instead of one whose two threads
    wait for each other at every operator while a decoder holds a core.
    """
    total = threads or cpu_cores()
    n = min(streams or AUTO_STREAMS, total)
    return n, max(1, total // n)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads burn the cycles the JPEG decoders need on a small machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtEngine:
    """``streams`` onnxruntime sessions over one exported backbone, each used by one thread at a time."""

    name = "onnxruntime"

    def __init__(self, path: Path, streams: int = 1, threads: int = 1):
        self.path, self.streams, self.threads = Path(path), streams, threads
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(streams):
            self._free.put(_session(self.path, threads))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        sess = self._free.get()
        try:
            return sess.run(["features"], {"image": np.ascontiguousarray(batch, np.float32)})[0]
        finally:
            self._free.put(sess)

    def metadata(self) -> dict[str, str]:
        sess = self._free.get()
        try:
            return dict(sess.get_modelmeta().custom_metadata_map)
        finally:
            self._free.put(sess)


def check_onnx(path: Path, model, size: int, tol: float | None = None) -> float:
    """Largest relative feature difference between ``path`` and torch at batch 1 and 4; raise above ``tol``."""
    import torch

    tol = ONNX_TOL if tol is None else tol

    x = np.random.default_rng(0).random((4, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x).contiguous()).float().numpy()
    sess = _session(path, 1)
    worst = 0.0
    for n in (1, len(x)):
        got = sess.run(["features"], {"image": x[:n]})[0]
        worst = max(worst, float(np.abs(got - ref[:n]).max()) / max(1.0, float(np.abs(ref[:n]).max())))
    if not worst <= tol:
        raise GraftError(
            f"ONNX backbone {path.name} drifts from torch: max relative |df| = {worst:.2e} > {tol:g}; "
            f"use featurize.engine: torch"
        )
    return worst


def export_backbone(model, path: Path, size: int, metadata: dict[str, str]) -> float:
    """Export a feature extractor to ``path`` (dynamic batch), check it against torch, publish atomically.

    Args:
        model: the backbone's :class:`~graft.backbones.FeatureExtractor` (normalisation included).
        path: where the checked graph lands.
        size: the input crop side.
        metadata: string pairs stored in the graph's ``metadata_props``.

    Returns:
        The relative max difference found by :func:`check_onnx`.
    """
    import onnx
    import torch

    model = model.eval().to(memory_format=torch.contiguous_format)  # featurize may have left it channels_last
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(2, 3, size, size),),
            str(tmp),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        proto = onnx.load(str(tmp))
        for k, v in {**metadata, WEIGHTS_KEY: graph_sha256(proto)}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
        drift = check_onnx(tmp, model, size)
    log.info("exported %s (max relative drift %.1e)", path, drift)
    return drift


def quantize_backbone(model, path: Path, size: int, metadata: dict[str, str], reader) -> None:
    """Export the fp32 backbone (checked against torch), quantize it to int8 on ``reader``'s images, publish
    the int8 graph at ``path`` with its hash; the fp32 graph is only a scratch file."""
    from graft.quantize import quantize_int8

    scratch = path.with_name(f".{path.stem}.fp32.onnx")
    try:
        export_backbone(model, scratch, size, metadata)
        with atomic_path(path) as tmp:
            meta = {**metadata, "graft.precision": "int8"}
            quantize_int8(
                scratch, tmp, reader, meta, hint="set featurize.precision: fp32", graph_hash=True, correct_output=True
            )
    finally:
        scratch.unlink(missing_ok=True)
    log.info("quantized %s to int8", path)


def ort_engine(
    cache: Path,
    fingerprint: str,
    model_fn: Callable[[], object],
    size: int,
    metadata: dict[str, str],
    threads: int = 0,
    streams: int = 0,
    quantize: Callable[[], object] | None = None,
) -> OrtEngine:
    """The onnxruntime engine for the backbone cached in ``cache``, exporting it first if needed.

    Args:
        cache: the feature cache folder of this fingerprint.
        fingerprint: must match the one recorded in an existing ``backbone.onnx``.
        model_fn: builds the torch feature extractor; called only when the graph must be exported.
        size: the input crop side.
        metadata: recorded in a newly exported graph (``graft.fingerprint`` among them).
        threads: inference threads in total; 0 = all cores.
        streams: sessions run side by side; 0 = one single-threaded session per thread.
        quantize: for an int8 cache, returns the calibration reader: the checked fp32 export is then
            statically quantized (:func:`graft.quantize.quantize_int8`) into the graph the engine runs.
    """
    path = cache / ONNX_FILE
    if path.is_file() and not graph_verified(path):  # exported before graphs carried their hash: redo it
        path.unlink()
    if not path.is_file():
        meta = {**metadata, "graft.fingerprint": fingerprint}
        if quantize is None:
            export_backbone(model_fn(), path, size, meta)
        else:
            quantize_backbone(model_fn(), path, size, meta, quantize())
    n, per = plan_threads(threads, streams)
    try:
        engine = OrtEngine(path, n, per)
    except Exception as exc:  # noqa: BLE001 - any unloadable graph gets the same fix
        raise GraftError(f"cannot load {path} ({str(exc).splitlines()[0]}); delete it and rerun") from None
    found = engine.metadata().get("graft.fingerprint")
    if found != fingerprint:
        raise GraftError(f"{path} was exported for fingerprint {found}, not {fingerprint}; delete it and rerun")
    return engine
