"""Ingest: find every image, fully decode it, hash it, quarantine the bad, and split by content hash.

Accepted layouts under ``data.root``:
  * class folders: ``<root>/<class>/**/<image>``
  * pre-split folders: ``<root>/{train,val,test}/<class>/**/<image>``
  * a manifest (``data.manifest``): CSV or Parquet with ``path,label`` and optional ``split``

Outputs (in ``data.out_dir``): ``manifest.parquet`` (path, sha256, label, split, width, height),
``quarantine.csv`` (path, reason) and ``classes.json``.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from graft import GraftError
from graft.atomic import write_csv, write_json, write_parquet
from graft.dataset import MANIFEST_COLUMNS, SPLITS, Candidate, discover_folders, discover_manifest
from graft.images import FILE_BYTES_CEILING, BadImage, load_rgb, read_regular
from graft.params import Params, SplitParams
from graft.tasks import stage_task

_VALIDATE_SIDE = 256  # validation decodes large JPEGs at a reduced scale (still a full entropy decode)


def inspect_file(c: Candidate, max_bytes: int = FILE_BYTES_CEILING) -> dict:
    """Read (regular files of at most ``max_bytes`` only), hash and fully decode one file; return a manifest
    row or a quarantine row."""
    try:
        data = read_regular(c.path, max_bytes)
    except BadImage as exc:  # a FIFO, a device, or too large: decided by stat before any open
        return {"path": c.rel, "reason": str(exc)}
    except OSError as exc:
        return {"path": c.rel, "reason": f"cannot read file: {exc.strerror or exc}"}
    if not data:
        return {"path": c.rel, "reason": "empty file (0 bytes)"}
    try:
        _, (width, height) = load_rgb(data, min_side=_VALIDATE_SIDE)
    except BadImage as exc:
        return {"path": c.rel, "reason": str(exc)}
    return {
        "path": c.rel,
        "sha256": hashlib.sha256(data).hexdigest(),
        "label": c.label,
        "split": c.split,
        "width": width,
        "height": height,
    }


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
        only = f": only {_shown(counts.index[0])}" if len(counts) else ""
        raise GraftError(f"need at least 2 classes with usable images, found {len(counts)}{only}")
    small = counts[counts < min_per_class]
    if len(small):
        raise GraftError(
            f"class {_shown(small.index[0])} has {small.iloc[0]} usable image(s), "
            f"fewer than ingest.min_images_per_class={min_per_class}"
        )
    no_train = sorted(set(counts.index) - set(rows.loc[rows["split"] == "train", "label"]))
    if no_train:
        raise GraftError(
            f"class {_shown(no_train[0])} has no image in the train split: add images or adjust data.split"
        )
    return sorted(counts.index)


def _shown(label: str, limit: int = 60) -> str:
    """A label as an error message shows it: quoted, and cut (a 100,000-character label is one line too many)."""
    return repr(label) if len(label) <= limit else f"{label[:limit]!r}... ({len(label)} characters)"


def _failed(out: Path, quarantine: list[dict]) -> None:
    """A failed ingest: the previous manifest and class map go (as under ``dvc repro``), so what remains,
    the quarantine of this run, never sits beside a manifest of another."""
    for name in ("manifest.parquet", "classes.json"):
        (out / name).unlink(missing_ok=True)
    q = pd.DataFrame(quarantine, columns=["path", "reason"]).sort_values("path", kind="stable")
    write_csv(out / "quarantine.csv", q)


def ingest(params: Params) -> dict:
    """Run the ingest stage; write manifest, quarantine and class map; return a summary."""
    root, out = Path(params.data.root), Path(params.data.out_dir)
    ignored = 0
    if params.data.manifest:
        cands, quarantine = discover_manifest(root, Path(params.data.manifest))
    else:
        cands, quarantine, ignored = discover_folders(root, params.ingest.allow_links_outside_root)
    if not cands and not quarantine:
        found = f"only {ignored} non-image file(s)" if ignored else "the folder is empty"
        raise GraftError(
            f"no usable images found under {root}: {found}; put images in {root}/<class>/ folders "
            "(or train/val/test folders, or set data.manifest)"
        )
    if not cands:
        _failed(out, quarantine)
        raise GraftError(
            f"no usable images found under {root}: all {len(quarantine)} image file(s) refused, "
            f"reasons in {out / 'quarantine.csv'}"
        )
    n_total = len(cands) + len(quarantine)  # every file seen, including those refused before decoding
    with ThreadPoolExecutor(params.ingest.workers) as pool:
        results = list(pool.map(functools.partial(inspect_file, max_bytes=params.ingest.max_file_bytes), cands))
    good = [r for r in results if "sha256" in r]
    quarantine += [r for r in results if "sha256" not in r]
    rows = pd.DataFrame(good, columns=MANIFEST_COLUMNS)

    conflicts = label_conflicts(rows)
    if len(conflicts) and params.ingest.label_conflicts == "quarantine":
        labels = conflicts.groupby("sha256")["label"].agg(lambda s: ", ".join(sorted(set(s))))
        quarantine += [
            {"path": r.path, "reason": f"same image under labels [{labels[r.sha256]}]"} for r in conflicts.itertuples()
        ]
        rows = rows.drop(conflicts.index)
    q = pd.DataFrame(quarantine, columns=["path", "reason"]).sort_values("path", kind="stable")

    n_bad = len(q)
    if n_total and n_bad / n_total > params.ingest.max_bad_fraction:
        _failed(out, quarantine)
        raise GraftError(
            f"{n_bad} of {n_total} files are unusable ({n_bad / n_total:.0%} > ingest.max_bad_fraction="
            f"{params.ingest.max_bad_fraction:g}); reasons in {out / 'quarantine.csv'}"
        )
    rows, moved = assign_splits(rows, params.data.split)
    classes = check_classes(rows, params.ingest.min_images_per_class)
    rows = rows.sort_values("path", kind="stable").reset_index(drop=True)
    rows[["width", "height"]] = rows[["width", "height"]].astype("int32")
    write_parquet(out / "manifest.parquet", rows)
    write_json(out / "classes.json", {"classes": classes})
    write_csv(out / "quarantine.csv", q)  # after the manifest: the three outputs describe one run
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
