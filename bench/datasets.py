"""Real small image sets for the transfer benchmark, assembled offline from installed packages.

    apt-get update && apt-get install -y oxygen-icon-theme tuxpaint-stamps-default fonts-noto-color-emoji unicode-data
    python bench/datasets.py [--sets digits,icons,stamps,emoji] [--out cache/bench] [--seed 0] [--force]

Each set becomes ``<out>/<set>/pool/<class>/*.png`` (what graft may see: it splits it into
train/val/test itself) and ``<out>/<set>/heldout/<class>/*.png`` (a disjoint part graft never sees,
scored once at the end), plus ``<out>/<set>/sources.json`` (source, installed version, counts).
Images are deduplicated by decoded pixels before splitting: an image that occurs under two labels
is dropped everywhere, one that occurs twice under one label is kept once, so no held-out image is
a copy of a pool image. Nothing is downloaded: digits ship with scikit-learn, the rest with Debian
(the readers are in bench/set_sources.py).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from set_sources import BUILDERS, NEEDS, SOURCES, Item, require  # bench/set_sources.py: the readers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft import GraftError  # noqa: E402 - after sys.path points at this checkout

POOL_PER_CLASS = 100  # graft sees at most this many images per class
HELDOUT_FRACTION = 0.3  # share of a small class held out ...
HELDOUT_PER_CLASS = 100  # ... and at most this many (the rest of a big class is not used)
MIN_PER_CLASS = 20  # classes with fewer unique images are left out (too few to learn or to score)


def check_sources(names: list[str], out: str | os.PathLike[str], seed: int = 0, force: bool = False) -> None:
    """Fail before any work when a set that :func:`build_set` would build lacks its Debian package.

    One message names every missing package, so a run over several sets does not stop after the first one's
    rows (a set whose build under ``out`` is reused needs nothing).
    """
    require(
        need
        for name in names
        if force or _reusable(Path(out) / name, _spec(name, seed)) is None
        for need in NEEDS.get(name, ())
    )


def _pixel_key(data: bytes) -> str:
    """Content key by decoded pixels: catches byte copies and the same picture encoded twice."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()


def dedupe(items: list[Item]) -> tuple[dict[str, list[Item]], dict[str, int]]:
    """Group items by label, dropping pixel-identical copies: all of them if the labels disagree."""
    labels: dict[str, set[str]] = {}
    first: dict[str, Item] = {}
    for item in items:
        key = _pixel_key(item[2])
        labels.setdefault(key, set()).add(item[0])
        first.setdefault(key, item)
    by_label: dict[str, list[Item]] = {}
    for key, item in first.items():
        if len(labels[key]) == 1:
            by_label.setdefault(item[0], []).append(item)
    dropped = {
        "copies_same_label": len(items) - len(first),
        "conflicting_labels": sum(len(v) > 1 for v in labels.values()),
    }
    return by_label, dropped


def split_counts(
    n: int, pool_cap: int = POOL_PER_CLASS, frac: float = HELDOUT_FRACTION, heldout_cap: int = HELDOUT_PER_CLASS
) -> tuple[int, int]:
    """(pool, heldout) sizes for a class of ``n`` unique images."""
    heldout = min(heldout_cap, max(math.ceil(n * frac), n - pool_cap))
    return min(pool_cap, n - heldout), heldout


def _installed_version(name: str) -> str:
    if name == "digits":
        import sklearn

        return f"scikit-learn {sklearn.__version__}"
    pkgs = [package for _, package in NEEDS[name]]
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Version}\\n", *pkgs], check=False, capture_output=True, text=True
    )
    found = "; ".join(out.stdout.split("\n")[:-1]) or "unknown (dpkg-query failed)"
    if name == "emoji":  # without libraqm Pillow draws ZWJ sequences as several glyphs: fewer emoji qualify
        import PIL
        from PIL import features

        found += f"; Pillow {PIL.__version__} (raqm {'yes' if features.check('raqm') else 'no'})"
    return found


def _spec(name: str, seed: int) -> dict:
    """What a build depends on besides the installed packages (recorded in its sources.json)."""
    return {
        "set": name,
        "seed": seed,
        "pool_per_class": POOL_PER_CLASS,
        "heldout_fraction": HELDOUT_FRACTION,
        "heldout_per_class": HELDOUT_PER_CLASS,
        "min_per_class": MIN_PER_CLASS,
    }


def _reusable(final: Path, spec: dict) -> dict | None:
    """The sources.json record of the build in ``final`` if it was made with ``spec``, else None."""
    record_path = final / "sources.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    return record if record.get("spec") == spec else None


def build_set(name: str, out: str | os.PathLike[str], seed: int = 0, force: bool = False) -> dict:
    """Materialise one set under ``out/name`` (rebuilt atomically); return its sources.json record.

    Reuses an existing build made with the same seed and caps unless ``force``.
    """
    if name not in BUILDERS:
        raise GraftError(f"unknown set {name!r}: choose from {', '.join(BUILDERS)}")
    final = Path(out) / name
    spec = _spec(name, seed)
    reused = None if force else _reusable(final, spec)
    if reused is not None:
        return reused
    by_label, dropped = dedupe(list(BUILDERS[name]()))
    small = sorted(c for c, v in by_label.items() if len(v) < MIN_PER_CLASS)
    counts: dict[str, dict[str, int]] = {}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    try:
        for ci, label in enumerate(sorted(set(by_label) - set(small))):
            items = sorted(by_label[label], key=lambda it: it[1])
            order = np.random.default_rng([seed, ci]).permutation(len(items))
            n_pool, n_held = split_counts(len(items))
            for part, idx in (("heldout", order[:n_held]), ("pool", order[n_held : n_held + n_pool])):
                folder = tmp / part / label
                folder.mkdir(parents=True)
                for i in idx:
                    (folder / f"{items[i][1]}.png").write_bytes(items[i][2])
            counts[label] = {"pool": n_pool, "heldout": n_held, "unused": len(items) - n_pool - n_held}
        if len(counts) < 2:
            raise GraftError(f"{name}: fewer than 2 classes with >= {MIN_PER_CLASS} unique images")
        record = {
            "spec": spec,
            "source": SOURCES[name],
            "installed": _installed_version(name),
            "classes": counts,
            "dropped": {**dropped, "classes_under_min": small},
        }
        (tmp / "sources.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the set appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def format_counts(record: dict) -> str:
    """One line per class: pool / heldout / unused, then the totals and what was dropped."""
    rows = [
        f"  {c:<16} pool {v['pool']:>4}  heldout {v['heldout']:>4}  unused {v['unused']:>4}"
        for c, v in record["classes"].items()
    ]
    tot = {k: sum(v[k] for v in record["classes"].values()) for k in ("pool", "heldout", "unused")}
    d = record["dropped"]
    rows.append(
        f"  {'total':<16} pool {tot['pool']:>4}  heldout {tot['heldout']:>4}  unused {tot['unused']:>4}"
        f"   (dropped: {d['copies_same_label']} same-label copies, {d['conflicting_labels']} images under "
        f"two labels, classes under {MIN_PER_CLASS}: {', '.join(d['classes_under_min']) or 'none'})"
    )
    return "\n".join([f"{record['spec']['set']}: {record['installed']}", *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(BUILDERS))
    ap.add_argument("--out", default=str(REPO / "cache" / "bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    try:
        check_sources(names, args.out, args.seed, args.force)
        for name in names:
            print(format_counts(build_set(name, args.out, args.seed, args.force)))
    except GraftError as exc:
        print(f"datasets: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
