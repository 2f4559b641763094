"""int8 export: onnxruntime static quantization calibrated on train-split images (``export.quantize: int8``).

QDQ format, per-channel int8 weights and uint8 activations whose ranges are calibrated on
train-split images preprocessed exactly like ``graft predict``; the graph keeps graft's metadata.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.images import BadImage, Preprocess, load_batch


def int8_path(out: str | Path) -> Path:
    """Where the int8 model of ``out`` goes: ``models/model.onnx`` -> ``models/model.int8.onnx``."""
    p = Path(out)
    return p.with_name(f"{p.stem}.int8{p.suffix or '.onnx'}")


def calibration_paths(manifest: pd.DataFrame, root: Path, n: int) -> list[Path]:
    """Up to ``n`` distinct train-split images, classes interleaved, in a stable (content-hash) order."""
    train = manifest[manifest["split"] == "train"].drop_duplicates("sha256").sort_values("sha256")
    if train.empty:
        raise GraftError("export.quantize needs train-split images to calibrate on; the manifest has none")
    order = train.assign(_rank=train.groupby("label").cumcount()).sort_values(["_rank", "label"], kind="stable")
    return [root / p for p in order["path"].head(n)]


# How int8 feature graphs are made (below): in the fingerprint, so caches of an earlier scheme are not mixed in.
INT8_SCHEME = "static QDQ, 7-bit per-channel weights, per-channel output correction"


def with_precision(description: dict, precision: str) -> dict:
    """A backbone description for features computed at ``precision`` (``featurize.precision``): fp32 is the
    backbone's own; the int8 graph computes other features, so it gets its own fingerprint and cache folder."""
    if precision == "fp32":
        return description
    return {**description, "precision": precision, "quantization": INT8_SCHEME}


class CalibrationReader:
    """onnxruntime ``CalibrationDataReader``: decodes the calibration images lazily, a few at a time."""

    def __init__(self, paths: list[Path], pp: Preprocess, batch_size: int = 8):
        self.paths, self.pp, self.batch_size = paths, pp, batch_size
        self._batches = iter([paths[i : i + batch_size] for i in range(0, len(paths), batch_size)])

    def again(self) -> CalibrationReader:
        """A reader over the same images from the start (quantize_static has used this one up)."""
        return CalibrationReader(self.paths, self.pp, self.batch_size)

    def get_next(self) -> dict | None:
        chunk = next(self._batches, None)
        if chunk is None:
            return None
        try:
            return {"image": load_batch(chunk, self.pp)}
        except BadImage as exc:
            raise GraftError(f"cannot decode a calibration image ({exc}); rerun ingest") from None


QUANTIZED_OPS = ["Conv", "Add", "Clip", "Relu"]  # the backbone's body; the head and softmax stay float


def quantize_int8(
    src: Path,
    dst: Path,
    reader: CalibrationReader,
    metadata: dict[str, str],
    hint: str = "set export.quantize: null",
    graph_hash: bool = False,
    correct_output: bool = False,
) -> None:
    """Write the int8 QDQ model of ``src`` to ``dst`` with ``metadata`` (graft's keys) copied in.

    QDQ with per-channel int8 weights and uint8 activations is onnxruntime's fast path on x86
    (measured on the 2-core EPYC: QOperator and int8 activations were slower). The weights use 7 of the 8
    bits (``reduce_range``, -64..64): x86 CPUs without VNNI multiply uint8 by int8 with ``vpmaddubsw``, whose
    16-bit sums of two products saturate past 32,767 (255 x 127 x 2 = 64,770; 255 x 64 x 2 = 32,640 fits).
    On an AVX2 CPU this halved the int8 features' median relative error on the digits pool (0.078 -> 0.038),
    and the integer sums of a graph no longer depend on whether the CPU has VNNI. The head and, in a
    deep net, the first three and the last convolutions stay float: quantizing everything cost ~3 points on
    the digits demo. On Lite0 (its stem and first block at 112 px) the first three rather than the first one
    cut the median relative feature error from 0.103 to 0.090 on the digits pool and from 0.113 to 0.091 on
    the stamps pool, for about 3 % of int8 featurize speed. MinMax calibration keeps only per-tensor min/max
    per batch, so its memory stays small. ``correct_output`` (the int8 feature backbone) then maps each output
    channel back onto the fp32 graph's (:func:`output_correction`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize.") as scratch:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        float_convs = convs[:3] + convs[-1:] if len(convs) > 8 else []  # in a shallow net the ends are the work
        try:
            quantize_static(
                str(pre),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=QUANTIZED_OPS,
                nodes_to_exclude=float_convs,
                reduce_range=True,  # 7-bit weights: no saturation in the u8s8 kernels of CPUs without VNNI
            )
            proto = onnx.load(str(dst))
            if correct_output:
                append_affine(proto, *output_correction(pre, dst, reader.again()))
        except GraftError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; all mean "cannot quantize this graph"
            raise GraftError(
                f"int8 quantization failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"{hint}"
            ) from None
    del proto.metadata_props[:]
    if graph_hash:  # a graph graft reuses later (the int8 backbone): its hash, checked before each use
        from graft.integrity import WEIGHTS_KEY, graph_sha256

        metadata = {**metadata, WEIGHTS_KEY: graph_sha256(proto)}
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))


def output_correction(fp32: Path, int8: Path, reader: CalibrationReader) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the gain and offset that map the int8 graph's outputs onto the fp32 graph's: the
    least-squares line through the calibration images' (int8, fp32) pairs, gain kept in [0.5, 2].

    Quantization error is partly systematic: rounding and clipped ranges shift and shrink a channel the same
    way for every image (Finkelstein et al. 2019, "Fighting quantization bias with bias"). A feature cache
    feeds heads that are later served on fp32 features (``model.onnx``), so a systematic shift is a train/serve
    skew. Measured on the digits pool (64 calibration images, ``bench/transfer.py`` sets): median relative
    feature error 0.089 -> 0.073, and graft's head on the features -0.50 -> -0.24 pt of macro-F1 against fp32
    over 8 training seeds (icons +0.41 -> +0.26, stamps +1.13 -> +1.10); -0.29 pt through ``bench/transfer.py``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    pairs = [ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]) for path in (fp32, int8)]
    outs: list[list[np.ndarray]] = [[], []]
    while (batch := reader.get_next()) is not None:
        for out, sess in zip(outs, pairs, strict=True):
            out.append(sess.run(None, batch)[0].astype(np.float64))
    f32, f8 = (np.concatenate(o) for o in outs)
    c8 = f8 - f8.mean(0)
    var = (c8**2).mean(0)
    cov = (c8 * (f32 - f32.mean(0))).mean(0)
    gain = np.clip(np.divide(cov, var, out=np.ones_like(var), where=var > 1e-12), 0.5, 2.0)
    return gain.astype(np.float32), (f32.mean(0) - gain * f8.mean(0)).astype(np.float32)


def append_affine(proto, gain: np.ndarray, offset: np.ndarray) -> None:
    """Make ``proto``'s first output ``gain * output + offset`` (per channel, in place)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    name = graph.output[0].name
    raw = f"{name}_int8"
    for node in graph.node:
        node.output[:] = [raw if o == name else o for o in node.output]
    graph.initializer.extend(
        [numpy_helper.from_array(gain, f"{name}_gain"), numpy_helper.from_array(offset, f"{name}_offset")]
    )
    graph.node.extend(
        [
            helper.make_node("Mul", [raw, f"{name}_gain"], [f"{name}_scaled"], name=f"{name}_correct_gain"),
            helper.make_node("Add", [f"{name}_scaled", f"{name}_offset"], [name], name=f"{name}_correct_offset"),
        ]
    )


def int8_metadata(meta: dict[str, str], calibration_images: int) -> dict[str, str]:
    """The fp32 graph's metadata plus how the int8 graph was made (``graft.quantization``)."""
    how = {
        "dtype": "int8",
        "method": "onnxruntime static QDQ",
        "weights": "int8 per-channel, 7-bit range",
        "activations": "uint8 MinMax",
        "float": "head; first three and last Conv of deep nets",
        "calibration_images": calibration_images,
    }
    return {**meta, "graft.quantization": json.dumps(how)}
