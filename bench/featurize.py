"""Benchmark graft's featurize stage against a per-image loop and the engine's own roofline, in one run.

    .venv/bin/python bench/featurize.py                 # 10 000 photos, RSS at 2 000 and 20 000 (~6-8 min on 2 cores)
    .venv/bin/python bench/featurize.py --quick         # small sizes: a smoke test (~1-2 min)
    .venv/bin/python bench/featurize.py --dir /data/b   # keep (and reuse) the generated photos there

Prints, from one run and one process (so the ratios share the machine's state):
  (a) the seed-style loop: PIL decode + resize, torch eager forward, one image at a time;
  (b) graft's featurize stage end to end from files (fresh feature cache);
  (c) the engine's forward-only roofline on pre-decoded tensors (measured before and after b);
then the cache-hit rerun, a rerun after adding 10 % new photos, and peak RSS of featurize
subprocesses over two image counts. Timings on a shared machine are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from featurize_parts import per_image_loop, roofline, rss_run, seed_engine_file, timed  # bench/featurize_parts.py
from photos import make_bases, photo_name, write_photos  # bench/photos.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the graft imports below (inside functions) use this checkout's code

TARGETS = {
    "img_per_s": 150.0,
    "of_roofline": 0.7,
    "vs_loop": 8.0,
    "cache_hit_s": 3.0,
    "add_10pct": 0.15,
    "rss_ratio": 1.10,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="folder for photos and workspaces (default: a temporary folder, removed)")
    p.add_argument("--count", type=int, default=10_000, help="photos in the main run (and the cache-hit rerun)")
    p.add_argument("--rss-counts", default="2000,20000", help="image counts of the peak-RSS subprocesses ('' skips)")
    p.add_argument("--loop-images", type=int, default=200, help="photos timed in the per-image loop (a)")
    p.add_argument("--large-fraction", type=float, default=0.02, help="share of 4000x3000 photos (the rest 500x375)")
    p.add_argument(
        "--distinct", type=int, default=300, help="distinct base photos (files beyond reuse them with new bytes)"
    )
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--engine", default=None, help="featurize.engine override (auto | onnxruntime | torch)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="decoder threads")
    p.add_argument("--threads", type=int, default=None, help="inference threads in total")
    p.add_argument("--streams", type=int, default=None, help="onnxruntime sessions side by side")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.rss_counts, args.loop_images, args.distinct = 200, "100,400", 20, 40
    return args


# --- workspace helpers


def featurize_overrides(args: argparse.Namespace) -> dict:
    keys = {
        "engine": args.engine,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
        "streams": args.streams,
    }
    return {"backbone": args.backbone, **{k: v for k, v in keys.items() if v is not None}}


def workspace(base: Path, name: str, photos: Path, names: list[str], args: argparse.Namespace):
    """A workspace whose manifest CSV lists ``names`` (photo paths), with params pointing into it."""
    from graft.params import parse_params

    ws = base / name
    (ws / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": names, "label": [n.split("/")[0] for n in names]}).to_csv(ws / "list.csv", index=False)
    raw = {
        "data": {"root": str(photos), "manifest": str(ws / "list.csv"), "out_dir": str(ws / "data")},
        "ingest": {"max_bad_fraction": 0.0},
        "featurize": {
            **featurize_overrides(args),
            "cache_dir": str(ws / "cache"),
            "out": str(ws / "data/features.parquet"),
        },
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    return ws, parse_params(raw)


# --- the run


def mark(ok: bool) -> str:
    return "MET " if ok else "MISS"


def run(args: argparse.Namespace, base: Path) -> None:
    from graft.backbones import build_backbone
    from graft.engine import make_engine
    from graft.images import load_batch
    from graft.onnxengine import cpu_cores
    from graft.tasks.featurize import featurize
    from graft.tasks.ingest import ingest

    rss_counts = [int(c) for c in args.rss_counts.split(",") if c.strip()]
    n_add = max(1, args.count // 10)
    total = max([args.count + n_add, *rss_counts])
    photos = base / "photos"
    settings = {"distinct": args.distinct, "large_fraction": args.large_fraction}
    stamp = photos / "bench-photos.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{photos} was generated with {stamp.read_text().strip()}; use another --dir")
    _, t_gen = timed(
        lambda: write_photos(photos, 0, total, make_bases(args.distinct, args.large_fraction), args.large_fraction)
    )
    stamp.write_text(json.dumps(settings))
    names = [photo_name(i) for i in range(total)]
    n_large = sum(
        1
        for i in range(args.count)
        if args.large_fraction and i % round(1 / args.large_fraction) == round(1 / args.large_fraction) - 1
    )
    print(
        f"photos: {total} JPEGs in {photos} ({t_gen:.0f} s to generate); main run {args.count} "
        f"({args.count - n_large} x 500x375, {n_large} x 4000x3000); {cpu_cores()} cores; "
        f"load avg {os.getloadavg()[0]:.2f}"
    )

    ws, params = workspace(base, "main", photos, names[: args.count], args)
    _, t_ingest = timed(ingest, params)
    fp = params.featurize
    bb = build_backbone(fp.backbone, fp.weights, fp.image_size)
    from graft.cache import cache_dir_for, open_cache

    cache = cache_dir_for(fp.cache_dir, bb.name, bb.fingerprint)
    open_cache(cache, bb.describe())
    engine, t_export = timed(make_engine, fp, cache, bb.describe(), lambda: bb)
    print(
        f"ingest {t_ingest:.1f} s; engine {engine.name} (streams {engine.streams}), one-time backbone export + check "
        f"{t_export:.1f} s; batch {fp.batch_size}, decoders {fp.workers}"
    )

    # (a) per-image loop, (c) roofline, (b) the stage, (c) again
    rate_a, fwd_a = per_image_loop(bb, [photos / n for n in names[: args.loop_images]])
    print(
        f"(a) seed-style per-image loop     {rate_a:8.1f} img/s   ({args.loop_images} photos; its torch eager "
        f"batch-1 forward alone {fwd_a:.1f} img/s)",
        flush=True,
    )
    pre = [
        load_batch([photos / n for n in names[i : i + fp.batch_size]], bb.preprocess)
        for i in range(0, min(args.count, 4 * fp.batch_size), fp.batch_size)
    ]
    n_roof = max(2 * engine.streams, min(args.count, 1500) // fp.batch_size)
    roof_before = roofline(engine, pre, n_roof)
    summary_b, _ = timed(featurize, params)
    rate_b = summary_b["images"] / summary_b["stage_seconds"]
    roof_after = roofline(engine, pre, n_roof)
    rate_c = (roof_before + roof_after) / 2
    peak_b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"(b) graft featurize, end to end   {rate_b:8.1f} img/s   "
        f"({summary_b['images']} photos in {summary_b['stage_seconds']:.1f} s; "
        f"compute loop {summary_b['img_per_s']} img/s)"
    )
    print(
        f"(c) {engine.name} forward-only roofline {rate_c:6.1f} img/s   "
        f"(before b {roof_before:.1f}, after b {roof_after:.1f}; "
        f"{engine.streams} stream(s), pre-decoded batches of {fp.batch_size})"
    )
    single = None
    if engine.name == "onnxruntime" and engine.streams > 1:
        from graft.onnxengine import OrtEngine

        single = roofline(OrtEngine(cache / "backbone.onnx", 1, engine.streams * engine.threads), pre, n_roof)
        print(f"    (one session x {engine.streams * engine.threads} threads instead: {single:.1f} img/s)")
        rate_c = max(rate_c, single)  # the roofline is the best forward-only arrangement
    print(f"    b/a = {rate_b / rate_a:.1f}x   b/c = {rate_b / rate_c:.2f}   peak RSS of this process {peak_b:.0f} MiB")

    # cache hit, in process and as the CLI
    hit, _ = timed(featurize, params)
    cli, t_cli = timed(
        subprocess.run,
        [sys.executable, "-m", "graft.cli", "featurize", "--params", str(ws / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if cli.returncode:
        raise SystemExit(f"graft featurize failed: {cli.stderr[-2000:]}")
    print(
        f"cache-hit rerun over {hit['images']}: {hit['stage_seconds']:.2f} s in process "
        f"(computed {hit['computed']}); `graft featurize` CLI {t_cli:.2f} s incl. interpreter start and imports"
    )

    # +10 % new photos
    ws_add, params_add = workspace(base, "main", photos, names[: args.count + n_add], args)
    _, t_ingest_add = timed(ingest, params_add)
    add, _ = timed(featurize, params_add)
    add_share = add["stage_seconds"] / summary_b["stage_seconds"]
    print(
        f"+10 % photos ({n_add} new): {add['stage_seconds']:.2f} s = {add_share:.1%} of the full run "
        f"(computed {add['computed']}; ingest {t_ingest_add:.1f} s not counted)"
    )

    # peak RSS over image counts, each in a fresh interpreter
    rss = {}
    for n in rss_counts:
        ws_n, params_n = workspace(base, f"rss-{n}", photos, names[:n], args)
        ingest(params_n)
        seed_engine_file(cache, ws_n)
        rss[n] = rss_run(ws_n)
        r = rss[n]
        print(
            f"RSS {n:>6} photos: peak {r['rss_peak_kb'] / 1024:7.0f} MiB (at start {r['rss_start_kb'] / 1024:.0f} MiB, "
            f"growth {(r['rss_peak_kb'] - r['rss_start_kb']) / 1024:.0f} MiB); {r['summary']['img_per_s']} img/s, "
            f"stage {r['summary']['stage_seconds']:.1f} s",
            flush=True,
        )

    print(f"\ntargets (measured on this machine now; load avg {os.getloadavg()[0]:.2f}):")
    print(f"  {mark(rate_b >= TARGETS['img_per_s'])} end to end >= {TARGETS['img_per_s']:.0f} img/s: {rate_b:.1f}")
    print(
        f"  {mark(rate_b / rate_c >= TARGETS['of_roofline'])} >= {TARGETS['of_roofline']} of roofline: "
        f"{rate_b / rate_c:.2f}"
    )
    print(
        f"  {mark(rate_b / rate_a >= TARGETS['vs_loop'])} >= {TARGETS['vs_loop']:.0f}x the per-image loop: "
        f"{rate_b / rate_a:.1f}x"
    )
    note = "" if hit["images"] >= 10_000 else f" (only {hit['images']} images: use --count 10000)"
    print(
        f"  {mark(hit['stage_seconds'] < TARGETS['cache_hit_s'])} cache-hit rerun < {TARGETS['cache_hit_s']:.0f} s: "
        f"{hit['stage_seconds']:.2f} s in process, {t_cli:.2f} s CLI{note}"
    )
    print(
        f"  {mark(add_share <= TARGETS['add_10pct'])} +10 % images <= {TARGETS['add_10pct']:.0%} of a full run: "
        f"{add_share:.1%}"
    )
    if len(rss) >= 2:
        lo, hi = min(rss), max(rss)
        ratio = rss[hi]["rss_peak_kb"] / rss[lo]["rss_peak_kb"]
        print(f"  {mark(ratio <= TARGETS['rss_ratio'])} peak RSS {hi} vs {lo} images within 10 %: x{ratio:.3f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="graft-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob("main"):  # workspaces are per run; photos are kept for reuse
        shutil.rmtree(stale)
    for stale in base.glob("rss-*"):
        shutil.rmtree(stale)
    try:
        run(args, base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
