"""Export: backbone + head as one ONNX graph, checked against torch before it is published.

Graph contract: input ``image`` float32 [N, 3, H, W], RGB in [0, 1] after resize + centre crop
(normalisation is inside the graph); output ``probabilities`` float32 [N, classes]. The metadata
(``metadata_props``) carries the class names, the preprocessing, the backbone fingerprint and a
hash of the training data, all as JSON or plain strings.

With ``export.quantize: int8`` an int8 graph lands beside it (``model.int8.onnx``): onnxruntime
static quantization, QDQ format, per-channel int8 weights and uint8 activations whose ranges are
calibrated on train-split images preprocessed exactly like ``graft predict``. It carries the same
metadata, so ``graft predict --model models/model.int8.onnx`` works unchanged. Both models' test
accuracy and batch-1 / batch-32 latency go to ``<metrics_dir>/export.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.dataset import data_hash, read_manifest
from graft.images import BadImage, Preprocess, load_batch
from graft.model import Serving, classifier_from_payload, load_model, model_name
from graft.onnxexport import check_against_torch, export_onnx, onnx_metadata
from graft.params import Params
from graft.publish import publish_together, recover
from graft.quantize import CalibrationReader, calibration_paths, int8_metadata, int8_path, quantize_int8
from graft.tasks import stage_task


def check_images(manifest: pd.DataFrame, root: Path, pp: Preprocess, n: int) -> np.ndarray:
    """``n`` real images (test split first) for the numeric check, repeated if there are fewer."""
    order = manifest.assign(_k=manifest["split"].map({"test": 0, "val": 1, "train": 2})).sort_values(["_k", "path"])
    paths = [root / p for p in order["path"].head(n)]
    paths = (paths * (n // max(len(paths), 1) + 1))[:n]
    return load_batch(paths, pp)


# --- what export.json records: test accuracy and latency of each published model


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def eval_batches(
    manifest: pd.DataFrame, root: Path, classes: list[str], pp: Preprocess, batch_size: int = 32
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, label indices) over the distinct test-split images, decoded like ``graft predict``."""
    test = manifest[manifest["split"] == "test"].drop_duplicates("sha256")
    index = {c: i for i, c in enumerate(classes)}
    rows = [(root / r.path, index[r.label]) for r in test.itertuples() if r.label in index]
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        try:
            x = load_batch([p for p, _ in chunk], pp)
        except BadImage as exc:
            raise GraftError(f"cannot decode a test image for export metrics ({exc}); rerun ingest") from None
        yield x, np.array([y for _, y in chunk])


def onnx_accuracy(models: dict[str, Path], batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """Test accuracy of each ONNX model (decoding once for all), and each one's argmax agreement with the first."""
    sessions = {k: _session(p) for k, p in models.items()}
    first = next(iter(models))
    correct, agree, n = dict.fromkeys(models, 0), dict.fromkeys(models, 0), 0
    for x, y in batches:
        preds = {k: s.run(["probabilities"], {"image": x})[0].argmax(1) for k, s in sessions.items()}
        n += len(y)
        for k, pred in preds.items():
            correct[k] += int((pred == y).sum())
            agree[k] += int((pred == preds[first]).sum())
    return {
        k: {
            "test_accuracy": round(correct[k] / n, 4) if n else None,
            f"argmax_agreement_with_{first}": round(agree[k] / n, 4) if n else None,
            "test_images": n,
        }
        for k in models
    }


LATENCY_RUNS = {1: 20, 32: 7}  # timed runs per batch size, after two warm-up runs each


def latencies_ms(models: dict[str, Path], size: int, batch: int, runs: int) -> dict[str, float]:
    """Median wall time of one ``run`` at ``batch`` per model, in ms; the models take turns run by run,
    so a change in machine load hits them alike."""
    sessions = {k: _session(p) for k, p in models.items()}
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(runs + 2):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(["probabilities"], {"image": x})
            if i >= 2:  # the first two runs warm up allocations and caches
                times[k].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def model_report(
    models: dict[str, Path], size: int, batches: Iterator[tuple[np.ndarray, np.ndarray]], names: dict | None = None
) -> dict:
    """The export.json body: per model its file (as ``names`` calls it), sha256, test accuracy and latency;
    int8 vs fp32 ratios."""
    acc = onnx_accuracy(models, batches)
    lat = {b: latencies_ms(models, size, b, runs) for b, runs in LATENCY_RUNS.items()}
    report: dict = {}
    for k, path in models.items():
        ms = {f"batch_{b}": lat[b][k] for b in LATENCY_RUNS}
        report[k] = {
            "path": str((names or {}).get(k, path)),
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **acc[k],
            "latency_ms": ms,
            "img_per_s_batch_32": round(32e3 / ms["batch_32"], 1),
        }
    if "int8" in report:
        f, q = report["fp32"], report["int8"]
        for b in LATENCY_RUNS:
            report[f"int8_speedup_batch_{b}"] = round(f["latency_ms"][f"batch_{b}"] / q["latency_ms"][f"batch_{b}"], 2)
        if f["test_accuracy"] is not None:
            report["int8_accuracy_drop"] = round(f["test_accuracy"] - q["test_accuracy"], 4)
    report["latency_setup"] = {
        "runs": {f"batch_{b}": r for b, r in LATENCY_RUNS.items()},
        "statistic": "median",
        "order": "models interleaved run by run",
        "threads": "onnxruntime default",
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    return report


LATENCY_KEYS = ("latency_ms", "img_per_s_batch_32")  # wall-clock figures: they change on every run


def split_report(report: dict) -> tuple[dict, dict]:
    """(the deterministic figures, a DVC metric; the wall-clock latencies, a plain report file).

    Latencies differ on every run, so keeping them in a DVC metric would make ``dvc metrics diff``
    and ``dvc exp show`` report a change that is only machine noise.
    """
    metrics: dict = {}
    latency: dict = {}
    for k, v in report.items():
        if isinstance(v, dict) and "path" in v:  # one model's figures
            metrics[k] = {f: x for f, x in v.items() if f not in LATENCY_KEYS}
            latency[k] = {f: x for f, x in v.items() if f in LATENCY_KEYS}
        elif k.startswith("int8_speedup") or k == "latency_setup":
            latency[k] = v
        else:
            metrics[k] = v
    return metrics, latency


def export(params: Params) -> dict:
    """Run the export stage: write ``models/model.onnx`` only if it matches torch within tolerance.

    With ``export.quantize: int8`` also write ``model.int8.onnx``; record both models' test accuracy
    in ``<evaluate.metrics_dir>/export.json`` (a DVC metric) and their latency in
    ``export_latency.json`` beside the report (not a metric: it changes on every run). These files
    change together or not at all (:mod:`graft.publish`); a killed run's set is completed, and its
    leftovers removed, before anything else.
    """
    xp = params.export
    out, q_path, root = Path(xp.out), int8_path(xp.out), Path(params.data.root)
    reports = (
        Path(params.evaluate.metrics_dir) / "export.json",
        Path(params.evaluate.report).parent / "export_latency.json",
    )
    recover([out, q_path, *reports])
    for scratch in q_path.parent.glob(".quantize.*"):  # a killed quantization's working folder
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = read_manifest(params.data.out_dir)
    payload = load_model(Path(params.train.model_dir) / "model.pt")
    model, bb = classifier_from_payload(payload, final=True)  # train.refit: all ships the refit on every image
    unknown = (payload.get("calibration") or {}).get("unknown") or {}
    serving = Serving(model, unknown.get("score", "energy")).eval()  # calibrated probabilities + the score
    meta = onnx_metadata(
        payload["classes"],
        bb.preprocess,
        bb.name,
        bb.fingerprint,
        data_hash(manifest),
        payload["kind"],
        model_name(payload),
        payload.get("calibration"),
    )
    images = check_images(manifest, root, bb.preprocess, xp.check_batch)
    written = [out, q_path, *reports] if xp.quantize else [out, *reports]
    with publish_together(written, remove=[] if xp.quantize else [q_path]) as tmp:  # no stale int8 beside fp32
        export_onnx(serving, tmp[out], bb.preprocess.crop, xp.opset, meta)
        drift = check_against_torch(tmp[out], serving, images, xp.atol)
        models = {"fp32": tmp[out]}
        if xp.quantize == "int8":
            reader = CalibrationReader(calibration_paths(manifest, root, xp.calibration_images), bb.preprocess)
            quantize_int8(tmp[out], tmp[q_path], reader, int8_metadata(meta, xp.calibration_images))
            models["int8"] = tmp[q_path]
        batches = eval_batches(manifest, root, payload["classes"], bb.preprocess)
        report = model_report(models, bb.preprocess.crop, batches, {"fp32": out, "int8": q_path})
        for path, body in zip(reports, split_report(report), strict=True):
            tmp[path].write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = {"onnx": xp.out, "max_abs_diff": drift, "atol": xp.atol, "bytes": out.stat().st_size}
    if xp.quantize:
        summary.update(
            int8=str(q_path),
            int8_bytes=q_path.stat().st_size,
            int8_speedup_batch_32=report["int8_speedup_batch_32"],
            int8_accuracy_drop=report.get("int8_accuracy_drop"),
        )
    return summary


export_task = stage_task(export, "export")
