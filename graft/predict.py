"""Serve an exported model with onnxruntime only (no torch import on this path)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from graft import GraftError
from graft.images import IMAGE_EXTENSIONS, BadImage, Preprocess, load_rgb, preprocess
from graft.sources import read_bytes

PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation")  # Preprocess.as_dict(), the one schema


MAX_SIDE = 4096  # resize/crop bound: a forged 100000 px input would allocate tens of GB per image
MAX_CLASSES = 100_000
FORMATS = (".csv", ".parquet", ".jsonl")  # `graft predict --out`: the format follows the extension


def _fail(path: str | os.PathLike[str], what: str) -> GraftError:
    return GraftError(f"{path}: {what}: re-export it with `graft export` (or pass another --model)")


def read_metadata(
    meta: dict[str, str], path: str | os.PathLike[str], n_outputs: object = None, side: object = None
) -> tuple[list[str], Preprocess]:
    """The class names and preprocessing of a graft ONNX model, checked against one schema before any image
    is read: ``graft.classes`` a JSON list of distinct non-empty strings, as many as the graph's outputs
    (``n_outputs``, when the graph fixes it); ``graft.input`` the :meth:`Preprocess.as_dict` keys with sides
    within [1, MAX_SIDE], the crop equal to the graph's input side (``side``) when the graph fixes it.

    Raises:
        GraftError: one line naming the model file and the key.
    """
    if "graft.classes" not in meta or "graft.input" not in meta:
        raise GraftError(f"{path} has no graft metadata: export it with graft")
    try:
        classes, spec = json.loads(meta["graft.classes"]), json.loads(meta["graft.input"])
    except ValueError as exc:
        raise _fail(path, f"graft metadata is not valid JSON ({exc})") from None
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise _fail(path, f"graft.classes must be a list of 1 to {MAX_CLASSES} class names")
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise _fail(path, "graft.classes must hold distinct, non-empty strings")
    if isinstance(n_outputs, int) and n_outputs != len(classes):
        raise _fail(path, f"graft.classes names {len(classes)} classes but the graph outputs {n_outputs}")
    if not isinstance(spec, dict):
        raise _fail(path, "graft.input must be a JSON object")
    try:
        pp = Preprocess.from_dict({k: spec[k] for k in PREPROCESS_KEYS if k in spec})
    except GraftError as exc:
        raise _fail(path, f"graft.input: {exc}") from None
    if pp.resize > MAX_SIDE:
        raise _fail(path, f"graft.input: resize {pp.resize} is above {MAX_SIDE} px")
    if isinstance(side, int) and side != pp.crop:
        raise _fail(path, f"graft.input: crop {pp.crop} differs from the graph's input side {side}")
    return classes, pp


def _unknown_threshold(meta: dict[str, str], path: str | os.PathLike[str]) -> float | None:
    """The score below which the model answers "unknown" (``graft.unknown``), None when it has none."""
    try:
        spec = json.loads(meta.get("graft.unknown") or "{}")
    except ValueError:
        raise _fail(path, "graft.unknown is not valid JSON") from None
    value = spec.get("threshold") if isinstance(spec, dict) else None
    if value is not None and not isinstance(value, int | float):
        raise _fail(path, f"graft.unknown threshold must be a number, got {value!r}")
    return None if value is None else float(value)


UNKNOWN = "unknown"  # what graft predict answers for an image unlike the training classes


class OnnxClassifier:
    """An exported graft model: reads its preprocessing and class names from the ONNX metadata."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise GraftError(f"model {path} not found: run `graft export` (or `dvc repro`), or pass --model")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
            raise GraftError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "image" not in inputs or "probabilities" not in outputs:
            raise _fail(path, "the graph has no `image` input or no `probabilities` output")
        if len(inputs["image"]) != 4 or len(outputs["probabilities"]) != 2:
            raise _fail(path, "the graph's `image` is not [N, 3, H, W] or its `probabilities` not [N, classes]")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.classes, self.preprocess = read_metadata(meta, path, outputs["probabilities"][1], inputs["image"][2])
        self.path = str(path)
        self.metadata = dict(meta)
        self.unknown_below = _unknown_threshold(meta, path) if "in_distribution" in outputs else None

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities and, when the graph has one, the in-distribution score per image."""
        if self.unknown_below is None:
            return self.predict_arrays(batch), None
        proba, score = self.session.run(["probabilities", "in_distribution"], {"image": batch})
        return proba, np.ravel(score)

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        proba = self.session.run(["probabilities"], {"image": batch})[0]
        if proba.ndim != 2 or proba.shape[1] != len(self.classes):  # a graph with a symbolic class axis
            raise _fail(self.path, f"the graph returned {proba.shape[-1]} scores for {len(self.classes)} classes")
        return proba


def list_images(target: str | os.PathLike[str]) -> list[Path]:
    """One file, or every image file under a folder (hidden entries skipped, links to folders not followed)."""
    p = Path(target)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise GraftError(f"{p}: no such file or folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return out


def list_targets(target: str) -> list[str]:
    """:func:`list_images` for a local target, or the image files under an fsspec URL (hidden entries skipped)."""
    if "://" not in target:
        return [str(p) for p in list_images(target)]
    import fsspec

    fs, root = fsspec.core.url_to_fs(target)
    if fs.isfile(root):
        return [target]
    if not fs.isdir(root):
        raise GraftError(f"{target}: no such file or folder")

    def wanted(p: str) -> bool:
        rel = p[len(root) :].strip("/").split("/")
        return Path(p).suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel)

    return sorted(fs.unstrip_protocol(p) for p in fs.find(root) if wanted(p))


def predict_files(
    model: OnnxClassifier, paths: Sequence[str | os.PathLike[str]], batch_size: int = 32, top_k: int = 1
) -> Iterator[dict]:
    """Yield one record per file (a path or an fsspec URL), in input order: ``predicted`` and
    ``confidence`` (its probability), for ``top_k`` > 1 also ``top2_label``, ``top2_confidence``, ...,
    and ``error`` (None, or why the file was skipped). The one predict loop, local and on Dask workers."""
    if batch_size < 1 or top_k < 1:
        raise GraftError(f"batch size and top-k must be at least 1 (got {batch_size}, {top_k})")
    pp = model.preprocess
    k = min(top_k, len(model.classes))
    empty = dict.fromkeys(prediction_columns(k)[1:-1])
    for i in range(0, len(paths), batch_size):
        records: list[dict] = []
        arrays, good = [], []
        for p in paths[i : i + batch_size]:
            try:
                arrays.append(preprocess(load_rgb(read_bytes(str(p)), min_side=pp.resize)[0], pp))
                good.append(len(records))
                records.append({"path": str(p)})
            except FileNotFoundError:
                records.append({"path": str(p), **empty, "error": "file not found"})
            except BadImage as exc:
                records.append({"path": str(p), **empty, "error": str(exc)})
        if arrays:
            proba, scores = model.predict_scored(np.stack(arrays))
            for n, (j, pr) in enumerate(zip(good, proba, strict=True)):
                top = np.argsort(-pr, kind="stable")[:k]
                label = model.classes[top[0]]
                score = None if scores is None else float(scores[n])
                unknown = score is not None and model.unknown_below is not None and score < model.unknown_below
                records[j].update(
                    predicted=UNKNOWN if unknown else label,
                    confidence=float(pr[top[0]]),
                    best_guess=label,
                    in_distribution=score,
                )
                for rank, c in enumerate(top[1:], start=2):
                    records[j].update({f"top{rank}_label": model.classes[c], f"top{rank}_confidence": float(pr[c])})
                records[j]["error"] = None
        yield from records


def prediction_columns(top_k: int = 1) -> list[str]:
    """The columns of a predictions file: path, predicted ("unknown" when the in-distribution score is below
    the model's threshold), confidence (calibrated probability of the best guess), best_guess, the runners-up,
    in_distribution (the score), error."""
    ranks = [c for r in range(2, top_k + 1) for c in (f"top{r}_label", f"top{r}_confidence")]
    return ["path", "predicted", "confidence", "best_guess", *ranks, "in_distribution", "error"]


def output_format(out: str | os.PathLike[str]) -> str:
    """``csv``, ``parquet`` or ``jsonl`` from the file name, or a GraftError naming the accepted ones."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise GraftError(f"--out {out}: unknown extension {suffix or '(none)'!r}: use one of {', '.join(FORMATS)}")
    return suffix[1:]


def write_predictions(records: list[dict], out: str | Path, top_k: int = 1, sort: bool = True) -> Path:
    """Prediction records as one CSV, Parquet or JSON-lines file (by extension), written atomically.

    Sorted by path unless ``sort`` is False (``graft predict`` keeps the listing order).
    """
    import pyarrow as pa

    from graft.atomic import write_parquet, write_text

    fmt = output_format(out)
    names = prediction_columns(top_k)
    rows = [{k: r.get(k) for k in names} for r in records]
    if sort:
        rows.sort(key=lambda r: str(r["path"]))
    if fmt == "parquet":
        types = [
            (n, pa.float64() if n.endswith("confidence") or n == "in_distribution" else pa.string()) for n in names
        ]
        return write_parquet(out, pa.Table.from_pylist(rows, schema=pa.schema(types)))
    if fmt == "jsonl":
        return write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None is an empty cell
    return write_text(out, buf.getvalue())


def predict_proba(model: OnnxClassifier, paths: list[Path], batch_size: int = 64) -> np.ndarray:
    """Probabilities for readable image files (a bad file raises :class:`BadImage`)."""
    pp = model.preprocess
    out = [
        model.predict_arrays(
            np.stack([preprocess(load_rgb(p, min_side=pp.resize)[0], pp) for p in paths[i : i + batch_size]])
        )
        for i in range(0, len(paths), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(model.classes)), np.float32)
