"""Serve an exported model with onnxruntime only (no torch import on this path)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from graft import GraftError
from graft.images import IMAGE_EXTENSIONS, BadImage, Preprocess, load_rgb, preprocess
from graft.sources import read_bytes

PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation")  # Preprocess.as_dict(), the one schema


class OnnxClassifier:
    """An exported graft model: reads its preprocessing and class names from the ONNX metadata."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise GraftError(f"model {path} not found: run `dvc repro` (export stage) or pass --model")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
            raise GraftError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "graft.classes" not in meta:
            raise GraftError(f"{path} has no graft metadata: export it with graft")
        self.classes: list[str] = json.loads(meta["graft.classes"])
        spec = json.loads(meta["graft.input"])
        self.preprocess = Preprocess.from_dict({k: spec[k] for k in PREPROCESS_KEYS if k in spec})
        self.metadata = dict(meta)

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": batch})[0]


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
    """Yield one record per file (a path or an fsspec URL), in input order: the top-k labels and
    probabilities, or why it was skipped. The one predict loop, local and on Dask workers."""
    pp = model.preprocess
    for i in range(0, len(paths), batch_size):
        records: list[dict] = []
        arrays, good = [], []
        for p in paths[i : i + batch_size]:
            try:
                arrays.append(preprocess(load_rgb(read_bytes(str(p)), min_side=pp.resize)[0], pp))
                good.append(len(records))
                records.append({"path": str(p)})
            except FileNotFoundError:
                records.append({"path": str(p), "label": None, "probability": None, "error": "file not found"})
            except BadImage as exc:
                records.append({"path": str(p), "label": None, "probability": None, "error": str(exc)})
        if arrays:
            for k, pr in zip(good, model.predict_arrays(np.stack(arrays)), strict=True):
                top = np.argsort(-pr)[:top_k]
                records[k].update(label=model.classes[top[0]], probability=float(pr[top[0]]), error=None)
                if top_k > 1:
                    records[k]["top_k"] = [[model.classes[j], float(pr[j])] for j in top]
        yield from records


def write_predictions(records: list[dict], out: str | Path) -> Path:
    """Prediction records, sorted by path, as one Parquet file written atomically."""
    import pyarrow as pa

    from graft.atomic import write_parquet

    schema = pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("probability", pa.float64()), ("error", pa.string())]
    )
    rows = sorted(({k: r.get(k) for k in schema.names} for r in records), key=lambda r: str(r["path"]))
    return write_parquet(out, pa.Table.from_pylist(rows, schema=schema))


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
