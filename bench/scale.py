"""Scale-out benchmark: featurize on a Dask LocalCluster with 1 and with 2 workers of 1 thread each.

    .venv/bin/python bench/scale.py                                  # 600 photo-like JPEGs, EfficientNet-Lite0
    .venv/bin/python bench/scale.py --quick --backbone tiny_cnn      # 120 images, random tiny CNN: a smoke test
    .venv/bin/python bench/scale.py --count 2000 --shard-size 100

Both runs go through the real path (Prefect flow -> DaskTaskRunner -> one task per shard) on the
same folder into separate empty caches; the LocalCluster is started here with the kwargs graft's
runner uses and passed by address. Throughput is measured over the shards only (first submit to
last result, after the workers have imported graft), and the workers' CPU seconds over the run
show how many cores each run actually got. Also runs the local runner once as a reference, then
prints the 2-worker / 1-worker ratio and the cache equality check (same keys, no repeated row,
max |difference|). Prefect runs against a temporary server (``prefect_test_harness``). On a
shared machine the timings are noisy: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from photos import SMALL, make_bases, write_photos  # bench/photos.py, shared with bench/featurize.py

if TYPE_CHECKING:
    from graft.params import Params

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the graft imports below (inside functions) use this checkout's code


def bench_params(ws: Path, backbone: str, name: str, runner: str, workers: int, shard_size: int) -> Params:
    """The repo's params with every path inside ``ws`` and a cache of its own per run."""
    from graft.params import load_params, parse_params

    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["data"].update(root=str(ws / "raw"), out_dir=str(ws / "data"))
    raw["featurize"].update(
        backbone=backbone,
        weights=None,
        cache_dir=str(ws / name),
        out=str(ws / f"data/{name}.parquet"),
        runner=runner,
        shard_size=shard_size,
    )
    raw["featurize"]["dask"].update(address=None, n_workers=workers, threads_per_worker=1, decode_threads=0)
    return parse_params(raw)


def dask_run(params: Params) -> dict:
    """featurize_dask on a LocalCluster of ``n_workers`` x 1 thread, plus the CPU seconds its workers used.

    The cluster is started here, with the kwargs graft's own runner uses, and passed by address, so
    the workers' CPU time can be read before and after: on a shared machine it shows how many cores
    the run actually got, which the wall-clock ratio alone cannot.
    """
    from distributed import Client, LocalCluster

    from graft.flows.scale import featurize_dask
    from graft.tasks.shard import probe

    dp = params.featurize.dask
    with (
        LocalCluster(
            n_workers=dp.n_workers, threads_per_worker=dp.threads_per_worker, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        client.run(probe, "featurize")  # imports torch/onnxruntime in each worker before the clock starts
        cpu0 = client.run(time.process_time)
        dask = dp.model_copy(update={"address": lc.scheduler_address})
        summary = featurize_dask(
            params.model_copy(update={"featurize": params.featurize.model_copy(update={"dask": dask})})
        )
        cpu1 = client.run(time.process_time)
    return {**summary, "worker_cpu_s": sum(cpu1[w] - cpu0[w] for w in cpu1 if w in cpu0)}


def _cache(root: Path) -> Path:
    return next(p for p in root.iterdir() if p.is_dir())


def _check(label: str, cmp: dict) -> str:
    ok = cmp["same_keys"] and cmp["repeated_a"] == cmp["repeated_b"] == 0 and cmp["max_abs_diff"] <= 1e-4
    return (
        f"  {label:<22} {'OK ' if ok else 'BAD'}  keys {cmp['rows_a']}/{cmp['rows_b']} same={cmp['same_keys']}, "
        f"repeated rows {cmp['repeated_a']}/{cmp['repeated_b']}, max |diff| {cmp['max_abs_diff']:.1e}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=None, help="images to generate (default 600; 120 with --quick)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shard-size", type=int, default=None, help="images per shard (default: count / 12)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 120 images")
    ap.add_argument("--dir", help="workspace folder to keep (default: a temporary one)")
    args = ap.parse_args()
    count = args.count or (120 if args.quick else 600)
    shard_size = args.shard_size or max(1, count // 12)  # 12 shards: 6 per worker, small imbalance at the end
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from prefect.testing.utilities import prefect_test_harness

    from graft.cacheparts import compare_caches
    from graft.tasks.featurize import featurize
    from graft.tasks.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180):
        ws = Path(args.dir or tmp)
        load_before = os.getloadavg()
        write_photos(ws / "raw", 0, count, make_bases(distinct=min(count, 64), large_fraction=0.0), 0.0)
        ingest(bench_params(ws, args.backbone, "cache-local", "local", 1, shard_size))
        local = featurize(bench_params(ws, args.backbone, "cache-local", "local", 1, shard_size))
        runs = {n: dask_run(bench_params(ws, args.backbone, f"cache-{n}w", "dask", n, shard_size)) for n in (1, 2)}
        load_after = os.getloadavg()
        one, two = runs[1], runs[2]
        print(
            f"\nscale bench: {count} JPEGs {SMALL[0]}x{SMALL[1]}, {args.backbone}, shards of {shard_size} "
            f"({one['shards']} shards), {os.cpu_count()} CPUs; load average before {load_before[0]:.1f}, "
            f"after {load_after[0]:.1f}"
        )
        print(f"{'runner':<30} {'img/s':>7} {'compute s':>10} {'worker CPU s':>13} {'cores got':>10} {'img/CPU s':>10}")
        print(f"{'local (featurize.runner: local)':<30} {local['img_per_s']:>7.1f} {local['seconds']:>10.2f}")
        for n, r in runs.items():
            label = f"dask {n} worker{'s' if n > 1 else ''} x 1 thread"
            print(
                f"{label:<30} {r['img_per_s']:>7.1f} {r['seconds']:>10.2f} {r['worker_cpu_s']:>13.2f} "
                f"{r['worker_cpu_s'] / r['seconds']:>10.2f} {r['computed'] / r['worker_cpu_s']:>10.1f}"
            )
        print(
            f"throughput ratio 2 workers / 1 worker: {two['img_per_s'] / one['img_per_s']:.2f}x  "
            "(ideal 2.00x on 2 cores); "
            f"cores obtained ratio {two['worker_cpu_s'] / two['seconds'] / (one['worker_cpu_s'] / one['seconds']):.2f}x"
        )
        print(
            "compute s: first shard submitted to last result (cluster start-up and worker imports excluded); "
            "cores got = worker CPU s / compute s"
        )
        print("cache equality:")
        print(_check("dask 1w vs dask 2w", compare_caches(_cache(ws / "cache-1w"), _cache(ws / "cache-2w"))))
        print(_check("local vs dask 2w", compare_caches(_cache(ws / "cache-local"), _cache(ws / "cache-2w"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
