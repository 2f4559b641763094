"""Ingest: find every image, fully decode it, hash it, quarantine the bad, and split by content hash.

Accepted layouts under ``data.root``:
  * class folders: ``<root>/<class>/**/<image>``
  * pre-split folders: ``<root>/{train,val,test}/<class>/**/<image>``
  * a manifest (``data.manifest``): CSV or Parquet with ``path,label`` and optional ``split``

Outputs (in ``data.out_dir``): ``manifest.parquet`` (path, sha256, label, split, width, height),
``quarantine.csv`` (path, reason) and ``classes.json``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from graft import GraftError
from graft.atomic import write_csv, write_json, write_parquet
from graft.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from graft.params import Params, SplitParams
from tasks import stage_task

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "sha256", "label", "split", "width", "height"]
_VALIDATE_SIDE = 256  # validation decodes large JPEGs at a reduced scale (still a full entropy decode)


@dataclass(frozen=True)
class Candidate:
    """A file that should be an image, with its label and (for pre-split inputs) its split."""

    path: Path
    rel: str
    label: str
    split: str | None = None


def _walk(top: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``top`` (hidden entries skipped, symlinked folders not followed) and ignored files."""
    images, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(p)
    return images, ignored


def _subdirs(p: Path, root: Path) -> list[Path]:
    """Visible sub-folders. A symlinked folder counts only if it points outside the data root
    (a link back into the tree would list images twice or loop); links inside it are not followed."""
    inside = root.resolve()
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and not (d.is_symlink() and d.resolve().is_relative_to(inside)))


def discover_folders(root: Path) -> tuple[list[Candidate], list[dict], int]:
    """Candidates from a class-folder or train/val/test tree; loose images at the top are quarantined."""
    if not root.is_dir():
        raise GraftError(f"data root {root} does not exist (run `graft demo-data` or set data.root)")
    top = _subdirs(root, root)
    presplit = bool(top) and {d.name for d in top} <= set(SPLITS) and "train" in {d.name for d in top}
    groups = [(d, d.name) for d in top] if presplit else [(root, None)]
    cands, quarantine, ignored = [], [], 0
    loose = [(root, None)] + groups if presplit else groups
    for base, _ in loose:  # images with no class folder are recorded; other loose files (README) ignored
        for f in sorted(x for x in base.iterdir() if x.is_file() and not x.name.startswith(".")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                quarantine.append({"path": f.relative_to(root).as_posix(), "reason": "not inside a class folder"})
            else:
                ignored += 1
    for base, split in groups:
        classes = _subdirs(base, root)
        for cdir in classes:
            images, skipped = _walk(cdir)
            ignored += len(skipped)
            if not images:
                where = cdir.relative_to(root).as_posix()
                raise GraftError(f"class folder '{where}' has no images: add images or remove the folder")
            cands += [Candidate(p, p.relative_to(root).as_posix(), cdir.name, split) for p in images]
    return cands, quarantine, ignored


def discover_manifest(root: Path, manifest: Path) -> tuple[list[Candidate], list[dict]]:
    """Candidates from a CSV/Parquet manifest; paths resolve against ``root`` and may not escape it."""
    if not manifest.is_file():
        raise GraftError(f"manifest {manifest} not found (data.manifest)")
    try:
        df = pd.read_parquet(manifest) if manifest.suffix.lower() == ".parquet" else pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure gets one clear line
        raise GraftError(f"cannot read manifest {manifest}: {str(exc).splitlines()[0]}") from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise GraftError(f"manifest {manifest} lacks column(s) {sorted(missing)}; it needs path,label[,split]")
    base = root.resolve()
    cands, quarantine = [], []
    for row in df.itertuples(index=False):
        rel, label = str(row.path), str(row.label).strip()
        split = str(getattr(row, "split", "") or "").strip() or None
        full = (base / rel).resolve()
        if not full.is_relative_to(base):
            quarantine.append({"path": rel, "reason": "path escapes the data root"})
        elif not label:
            quarantine.append({"path": rel, "reason": "empty label"})
        elif split is not None and split not in SPLITS:
            quarantine.append({"path": rel, "reason": f"unknown split {split!r} (use train, val or test)"})
        else:
            cands.append(Candidate(full, full.relative_to(base).as_posix(), label, split))
    return cands, quarantine


def inspect_file(c: Candidate) -> dict:
    """Read, hash and fully decode one file; return a manifest row or a quarantine row."""
    try:
        data = c.path.read_bytes()
    except OSError as exc:
        return {"path": c.rel, "reason": f"cannot read file: {exc.strerror or exc}"}
    if not data:
        return {"path": c.rel, "reason": "empty file (0 bytes)"}
    try:
        _, (width, height) = load_rgb(data, min_side=_VALIDATE_SIDE)
    except BadImage as exc:
        return {"path": c.rel, "reason": str(exc)}
    return {"path": c.rel, "sha256": hashlib.sha256(data).hexdigest(), "label": c.label,
            "split": c.split, "width": width, "height": height}


def hash_split(sha256: str, fractions: SplitParams) -> str:
    """The split of an image as a function of its content hash alone.

    The first 64 bits of the hash are a uniform number in [0, 1); thresholds at the split
    fractions give every class the requested proportions in expectation. Adding images never
    moves an existing one, and identical bytes always land together.
    """
    u = int(sha256[:16], 16) / 2**64
    return "train" if u < fractions.train else ("val" if u < fractions.train + fractions.val else "test")


def assign_splits(rows: pd.DataFrame, fractions: SplitParams) -> tuple[pd.DataFrame, int]:
    """Fill missing splits from the hash; pull exact duplicates given in several splits into the earliest."""
    rows = rows.copy()
    hashed = rows["split"].isna()
    rows.loc[hashed, "split"] = [hash_split(s, fractions) for s in rows.loc[hashed, "sha256"]]
    order = {s: i for i, s in enumerate(SPLITS)}
    earliest = rows.groupby("sha256")["split"].transform(lambda s: min(s, key=order.__getitem__))
    moved = int((earliest != rows["split"]).sum())
    rows["split"] = earliest
    return rows, moved


def label_conflicts(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows whose exact bytes also appear under another label."""
    n_labels = rows.groupby("sha256")["label"].transform("nunique")
    return rows[n_labels > 1]


def check_classes(rows: pd.DataFrame, min_per_class: int) -> list[str]:
    """Validate the class set and return it sorted (the class index is the position)."""
    counts = rows["label"].value_counts()
    if len(counts) < 2:
        only = f": only {counts.index[0]!r}" if len(counts) else ""
        raise GraftError(f"need at least 2 classes with usable images, found {len(counts)}{only}")
    small = counts[counts < min_per_class]
    if len(small):
        raise GraftError(f"class {small.index[0]!r} has {small.iloc[0]} usable image(s), fewer than ingest.min_images_per_class={min_per_class}")
    no_train = sorted(set(counts.index) - set(rows.loc[rows["split"] == "train", "label"]))
    if no_train:
        raise GraftError(f"class {no_train[0]!r} has no image in the train split: add images or adjust data.split")
    return sorted(counts.index)


def ingest(params: Params) -> dict:
    """Run the ingest stage; write manifest, quarantine and class map; return a summary."""
    root, out = Path(params.data.root), Path(params.data.out_dir)
    ignored = 0
    if params.data.manifest:
        cands, quarantine = discover_manifest(root, Path(params.data.manifest))
    else:
        cands, quarantine, ignored = discover_folders(root)
    if not cands:
        write_csv(out / "quarantine.csv", pd.DataFrame(quarantine, columns=["path", "reason"]))
        raise GraftError(f"no usable images found under {root} (expected <class>/<image> folders, train/val/test "
                         f"folders, or data.manifest); {len(quarantine)} file(s) refused, see {out / 'quarantine.csv'}")
    n_total = len(cands) + len(quarantine)  # every file seen, including those refused before decoding
    with ThreadPoolExecutor(params.ingest.workers) as pool:
        results = list(pool.map(inspect_file, cands))
    good = [r for r in results if "sha256" in r]
    quarantine += [r for r in results if "sha256" not in r]
    rows = pd.DataFrame(good, columns=MANIFEST_COLUMNS)

    conflicts = label_conflicts(rows)
    if len(conflicts) and params.ingest.label_conflicts == "quarantine":
        labels = conflicts.groupby("sha256")["label"].agg(lambda s: ", ".join(sorted(set(s))))
        quarantine += [{"path": r.path, "reason": f"same image under labels [{labels[r.sha256]}]"}
                       for r in conflicts.itertuples()]
        rows = rows.drop(conflicts.index)
    q = pd.DataFrame(quarantine, columns=["path", "reason"]).sort_values("path", kind="stable")
    write_csv(out / "quarantine.csv", q)

    n_bad = len(q)
    if n_total and n_bad / n_total > params.ingest.max_bad_fraction:
        raise GraftError(f"{n_bad} of {n_total} files are unusable ({n_bad / n_total:.0%} > ingest.max_bad_fraction="
                         f"{params.ingest.max_bad_fraction:g}); reasons in {out / 'quarantine.csv'}")
    rows, moved = assign_splits(rows, params.data.split)
    classes = check_classes(rows, params.ingest.min_images_per_class)
    rows = rows.sort_values("path", kind="stable").reset_index(drop=True)
    rows[["width", "height"]] = rows[["width", "height"]].astype("int32")
    write_parquet(out / "manifest.parquet", rows)
    write_json(out / "classes.json", {"classes": classes})
    return {
        "images": len(rows),
        "classes": len(classes),
        **{s: int((rows["split"] == s).sum()) for s in SPLITS},
        "quarantined": n_bad,
        "ignored_non_images": ignored,
        "duplicate_images": int(rows["sha256"].duplicated().sum()),
        "duplicates_moved_to_one_split": moved,
        "label_conflicts": int(conflicts["sha256"].nunique()) if len(conflicts) else 0,
    }


ingest_task = stage_task(ingest, "ingest")
