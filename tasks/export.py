"""Export: backbone + head as one ONNX graph, checked against torch before it is published.

Graph contract: input ``image`` float32 [N, 3, H, W], RGB in [0, 1] after resize + centre crop
(normalisation is inside the graph); output ``probabilities`` float32 [N, classes]. The metadata
(``metadata_props``) carries the class names, the preprocessing, the backbone fingerprint and a
hash of the training data, all as JSON or plain strings.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import graft
from graft import GraftError
from graft.atomic import atomic_path
from graft.images import Preprocess, load_batch
from graft.model import classifier_from_payload, load_model
from graft.params import Params
from tasks import stage_task


def data_hash(manifest: pd.DataFrame) -> str:
    """A hash of what the model was trained and tested on: (sha256, label, split) rows, sorted."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["split"]))
    return hashlib.sha256("\n".join("\t".join(r) for r in rows).encode()).hexdigest()


def onnx_metadata(classes: list[str], pp: Preprocess, backbone: str, fingerprint: str, data_sha: str, kind: str) -> dict[str, str]:
    return {
        "graft.version": graft.__version__,
        "graft.kind": kind,
        "graft.classes": json.dumps(classes, ensure_ascii=False),
        "graft.input": json.dumps({
            "name": "image", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "channel_order": "RGB",
            "height": pp.crop, "width": pp.crop, "resize_shorter_side": pp.resize, "crop": "center",
            "interpolation": pp.interpolation, "mean": list(pp.mean), "std": list(pp.std),
            "normalization": "inside the graph: pass [0, 1] pixels, do not subtract mean/std",
        }),
        "graft.output": json.dumps({"name": "probabilities", "shape": ["batch", len(classes)]}),
        "graft.backbone": backbone,
        "graft.fingerprint": fingerprint,
        "graft.data_sha256": data_sha,
    }


def export_onnx(model: nn.Module, path: Path, size: int, opset: int, metadata: dict[str, str]) -> None:
    """Trace ``model`` to ONNX at ``path`` with a dynamic batch axis, add metadata, run the checker."""
    import onnx

    dummy = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load(str(path))
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def check_against_torch(path: Path, model: nn.Module, images: np.ndarray, atol: float) -> dict:
    """Compare onnxruntime and torch probabilities at batch 1 and batch N; raise if they drift."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = {}
    for name, batch in (("batch_1", images[:1]), (f"batch_{len(images)}", images)):
        with torch.inference_mode():
            ref = model(torch.from_numpy(batch)).numpy()
        got = sess.run(["probabilities"], {"image": batch})[0]
        diff = float(np.abs(got - ref).max())
        report[name] = diff
        if not diff <= atol:
            raise GraftError(f"ONNX export drifts from torch at {name}: max |dp| = {diff:.2e} > export.atol={atol:g}")
    return report


def check_images(manifest: pd.DataFrame, root: Path, pp: Preprocess, n: int) -> np.ndarray:
    """``n`` real images (test split first) for the numeric check, repeated if there are fewer."""
    order = manifest.assign(_k=manifest["split"].map({"test": 0, "val": 1, "train": 2})).sort_values(["_k", "path"])
    paths = [root / p for p in order["path"].head(n)]
    paths = (paths * (n // max(len(paths), 1) + 1))[:n]
    return load_batch(paths, pp)


def export(params: Params) -> dict:
    """Run the export stage: write ``models/model.onnx`` only if it matches torch within tolerance."""
    xp = params.export
    manifest = pd.read_parquet(Path(params.data.out_dir) / "manifest.parquet")
    payload = load_model(Path(params.train.model_dir) / "model.pt")
    model, bb = classifier_from_payload(payload)
    meta = onnx_metadata(payload["classes"], bb.preprocess, bb.name, bb.fingerprint, data_hash(manifest), payload["kind"])
    images = check_images(manifest, Path(params.data.root), bb.preprocess, xp.check_batch)
    with atomic_path(xp.out) as tmp:
        export_onnx(model, tmp, bb.preprocess.crop, xp.opset, meta)
        drift = check_against_torch(tmp, model, images, xp.atol)
    return {"onnx": xp.out, "max_abs_diff": drift, "atol": xp.atol, "bytes": Path(xp.out).stat().st_size}


export_task = stage_task(export, "export")
