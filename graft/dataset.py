"""The data set as the stages share it: discovery of labelled files, the manifest, the class map, the splits.

Ingest writes ``manifest.parquet`` (path, sha256, label, split, width, height) and ``classes.json``;
every later stage reads them through here, so a missing file names the command that makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.images import IMAGE_EXTENSIONS, UNSUPPORTED_EXTENSIONS

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "sha256", "label", "split", "width", "height"]


def read_manifest(out_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """``<out_dir>/manifest.parquet``; a missing one says to run ingest."""
    path = Path(out_dir) / "manifest.parquet"
    if not path.is_file():
        raise GraftError(f"{path} not found: run `graft ingest` (or `dvc repro`) first")
    return pd.read_parquet(path, columns=columns)


def read_classes(out_dir: str | Path) -> list[str]:
    """The class names, in model output order, from ``<out_dir>/classes.json``."""
    path = Path(out_dir) / "classes.json"
    if not path.is_file():
        raise GraftError(f"{path} not found: run `graft ingest` (or `dvc repro`) first")
    return list(json.loads(path.read_text())["classes"])


def split_arrays(
    manifest: pd.DataFrame, feats: dict[str, np.ndarray], classes: list[str], split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix and class indices of one split, in manifest order."""
    rows = manifest[manifest["split"] == split]
    index = {c: i for i, c in enumerate(classes)}
    if not len(rows):
        return np.zeros((0, next(iter(feats.values())).shape[0]), np.float32), np.zeros(0, np.int64)
    return np.stack([feats[s] for s in rows["sha256"]]), rows["label"].map(index).to_numpy(np.int64)


def split_items(
    manifest: pd.DataFrame, root: str | Path, classes: list[str], split: str
) -> tuple[list[str], np.ndarray]:
    """Image paths and class indices of one split, in manifest order."""
    rows = manifest[manifest["split"] == split]
    index = {c: i for i, c in enumerate(classes)}
    return [str(Path(root) / p) for p in rows["path"]], rows["label"].map(index).to_numpy(np.int64)


def data_hash(manifest: pd.DataFrame) -> str:
    """A hash of what the model was trained and tested on: (sha256, label, split) rows, sorted."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["split"], strict=True))
    return hashlib.sha256("\n".join("\t".join(r) for r in rows).encode()).hexdigest()


# --- discovery: which files should be images, with which label


@dataclass(frozen=True)
class Candidate:
    """A file that should be an image, with its label and (for pre-split inputs) its split."""

    path: Path
    rel: str
    label: str
    split: str | None = None


_OUTSIDE = "symbolic link leading outside the data root (set ingest.allow_links_outside_root to read it)"


def _rel(path: str | os.PathLike[str] | None, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix() if path else "?"


def _walk(top: Path, root: Path, allow_links: bool = False) -> tuple[list[Path], list[Path], list[dict]]:
    """Image files under ``top`` (hidden entries skipped, symlinked folders not followed), ignored files, and
    quarantine rows: folders that cannot be listed, unsupported image formats, links leaving the data root."""
    images: list[Path] = []
    ignored: list[Path] = []
    refused: list[dict] = []

    def unlistable(exc: OSError) -> None:  # os.walk would skip the folder without a word
        refused.append({"path": _rel(exc.filename, root), "reason": f"cannot list folder: {exc.strerror or exc}"})

    inside = root.resolve()
    for dirpath, dirnames, filenames in os.walk(top, onerror=unlistable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            ext = p.suffix.lower()
            if ext in UNSUPPORTED_EXTENSIONS:
                reason = f"unsupported image format ({UNSUPPORTED_EXTENSIONS[ext]}): convert it to PNG or JPEG"
                refused.append({"path": _rel(p, root), "reason": reason})
            elif ext not in IMAGE_EXTENSIONS:
                ignored.append(p)
            elif not allow_links and p.is_symlink() and p.exists() and not p.resolve().is_relative_to(inside):
                refused.append({"path": _rel(p, root), "reason": _OUTSIDE})
            else:
                images.append(p)
    return images, ignored, refused


def _subdirs(p: Path, root: Path, refused: list[dict], allow_links: bool = False) -> list[Path]:
    """Visible sub-folders. A symlinked folder pointing back into the data root is skipped (it would list
    images twice or loop); one pointing outside it is refused unless ``allow_links`` (then read, not followed)."""
    inside = root.resolve()
    out = []
    for d in sorted(p.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if d.is_symlink() and d.resolve().is_relative_to(inside):
            continue
        if d.is_symlink() and not allow_links:
            refused.append({"path": _rel(d, root), "reason": _OUTSIDE})
            continue
        out.append(d)
    return out


def discover_folders(root: Path, allow_links: bool = False) -> tuple[list[Candidate], list[dict], int]:
    """Candidates from a class-folder or train/val/test tree; loose images at the top are quarantined."""
    if not root.is_dir():
        raise GraftError(f"data root {root} does not exist (run `graft demo-data` or set data.root)")
    cands: list[Candidate] = []
    quarantine: list[dict] = []
    ignored = 0
    top = _subdirs(root, root, quarantine, allow_links)
    presplit = bool(top) and {d.name for d in top} <= set(SPLITS) and "train" in {d.name for d in top}
    groups = [(d, d.name) for d in top] if presplit else [(root, None)]
    loose = [(root, None)] + groups if presplit else groups
    for base, _ in loose:  # images with no class folder are recorded; other loose files (README) ignored
        for f in sorted(x for x in base.iterdir() if x.is_file() and not x.name.startswith(".")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                quarantine.append({"path": f.relative_to(root).as_posix(), "reason": "not inside a class folder"})
            else:
                ignored += 1
    for base, split in groups:
        classes = top if base == root and not presplit else _subdirs(base, root, quarantine, allow_links)
        for cdir in classes:
            images, skipped, refused = _walk(cdir, root, allow_links)
            ignored += len(skipped)
            quarantine += refused
            where = cdir.relative_to(root).as_posix()
            if not images and not refused:
                raise GraftError(f"class folder '{where}' has no images: add images or remove the folder")
            cands += [Candidate(p, p.relative_to(root).as_posix(), cdir.name, split) for p in images]
    return cands, quarantine, ignored


def discover_manifest(root: Path, manifest: Path) -> tuple[list[Candidate], list[dict]]:
    """Candidates from a CSV/Parquet manifest; paths resolve against ``root`` and may not escape it."""
    if not manifest.is_file():
        raise GraftError(f"manifest {manifest} not found (data.manifest)")
    try:
        df = (
            pd.read_parquet(manifest)
            if manifest.suffix.lower() == ".parquet"
            else pd.read_csv(manifest, dtype=str, keep_default_na=False)
        )
    except Exception as exc:  # noqa: BLE001 - any parse failure gets one clear line
        raise GraftError(f"cannot read manifest {manifest}: {str(exc).splitlines()[0]}") from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise GraftError(f"manifest {manifest} lacks column(s) {sorted(missing)}; it needs path,label[,split]")
    base = root.resolve()
    cands, quarantine = [], []
    first: dict[tuple[str, str], int] = {}  # (path, label) -> manifest row of its first listing
    for i, row in enumerate(df.itertuples(index=False), start=1):
        rel, label = _text(row.path), _text(row.label).strip()
        split = _text(getattr(row, "split", "")).strip() or None
        full = (base / rel).resolve() if rel and "\0" not in rel else None
        if full is None:
            reason = "path holds a NUL byte" if rel else "empty path"
            quarantine.append({"path": rel.replace("\0", "\\0"), "reason": reason})
        elif not full.is_relative_to(base):
            quarantine.append({"path": rel, "reason": "path escapes the data root"})
        elif not label:
            quarantine.append({"path": rel, "reason": "empty label"})
        elif split is not None and split not in SPLITS:
            quarantine.append({"path": rel, "reason": f"unknown split {split!r} (use train, val or test)"})
        elif (key := (full.relative_to(base).as_posix(), label)) in first:
            quarantine.append({"path": rel, "reason": f"listed twice in the manifest (first at row {first[key]})"})
        else:
            first[key] = i
            cands.append(Candidate(full, key[0], label, split))
    return cands, quarantine


def _text(value: object) -> str:
    """A manifest cell as text: null, NaN and NA (a Parquet manifest's missing values) are empty, not 'nan'."""
    return "" if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else str(value)
