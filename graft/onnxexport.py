"""The exported graph: what it says about itself (metadata) and the check that it computes what torch does.

Graph contract: input ``image`` float32 [N, 3, H, W], RGB in [0, 1] after resize + centre crop
(normalisation is inside the graph); outputs ``probabilities`` float32 [N, classes] (calibrated: the
temperature is inside the graph) and ``in_distribution`` float32 [N] (the energy score; below the
threshold in ``graft.unknown`` the answer is "unknown").
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import graft
from graft import GraftError
from graft.images import Preprocess

OUTPUTS = ("probabilities", "in_distribution")  # the graph's outputs, in order (graft.model.Serving)


def onnx_metadata(
    classes: list[str],
    pp: Preprocess,
    backbone: str,
    fingerprint: str,
    data_sha: str,
    kind: str,
    model_name: str = "",
    calibration: dict | None = None,
) -> dict[str, str]:
    """The graph's ``metadata_props``: the input contract uses the one preprocessing schema
    (:meth:`Preprocess.as_dict`: resize of the shorter side, centre crop, mean/std, interpolation)."""
    calibration = calibration or {}
    return {
        "graft.version": graft.__version__,
        "graft.kind": kind,
        "graft.model": model_name or f"{backbone} {kind}",
        "graft.classes": json.dumps(classes, ensure_ascii=False),
        "graft.input": json.dumps(
            {
                "name": "image",
                "layout": "NCHW",
                "dtype": "float32",
                "range": [0.0, 1.0],
                "channel_order": "RGB",
                **pp.as_dict(),
                "normalization": "inside the graph: pass [0, 1] pixels, do not subtract mean/std",
            }
        ),
        "graft.output": json.dumps(
            {
                "probabilities": {"shape": ["batch", len(classes)], "calibrated": "temperature inside the graph"},
                "in_distribution": {
                    "shape": ["batch"],
                    "meaning": "higher = more like the training classes; below graft.unknown's threshold: unknown",
                },
            }
        ),
        "graft.calibration": json.dumps(
            {"temperature": calibration.get("temperature", 1.0), "fitted_on_images": calibration.get("n", 0)}
        ),
        "graft.unknown": json.dumps(calibration.get("unknown") or {"score": "energy", "threshold": None}),
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
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=list(OUTPUTS),
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def check_against_torch(path: Path, model: nn.Module, images: np.ndarray, atol: float) -> dict:
    """Compare onnxruntime and torch at batch 1 and batch N, both outputs; raise if they drift.

    Probabilities must agree within ``atol``; the in-distribution score (a log-sum-exp of logits, not
    bounded by 1) within ``atol`` relative to its magnitude.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = {}
    for name, batch in (("batch_1", images[:1]), (f"batch_{len(images)}", images)):
        with torch.inference_mode():
            ref = [t.numpy() for t in model(torch.from_numpy(batch))]
        got = sess.run(list(OUTPUTS), {"image": batch})
        diff = float(np.abs(got[0] - ref[0]).max())
        score_diff = float((np.abs(got[1] - ref[1]) / np.maximum(1.0, np.abs(ref[1]))).max())
        report[name] = diff
        if not (diff <= atol and score_diff <= atol):
            raise GraftError(
                f"ONNX export drifts from torch at {name}: max |dp| = {diff:.2e}, score {score_diff:.2e} "
                f"> export.atol={atol:g}"
            )
    return report
