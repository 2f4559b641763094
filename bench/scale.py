"""Scale-out benchmark: featurize on LocalClusters (1 and 2 workers) and on a real scheduler + 2 worker processes.

    .venv/bin/python bench/scale.py                                  # 600 photo-like JPEGs, EfficientNet-Lite0
    .venv/bin/python bench/scale.py --quick --backbone tiny_cnn      # 120 images, random tiny CNN: a smoke test
    .venv/bin/python bench/scale.py --count 2000 --shard-size 100 --only-real

Every run goes through the real path (Prefect flow -> DaskTaskRunner -> one task per shard) on the
same folder into separate empty caches. The LocalClusters are started here with the kwargs graft's
runner uses; the real cluster is ``dask scheduler`` and ``dask worker --nworkers 2 --nthreads 1``
processes on 127.0.0.1 (``tests/dask_cluster.py``), with no Prefect settings of their own: they are
pointed at the driver's API by graft. Throughput is measured over the shards only (first submit to
last result, after the workers imported graft); the workers' CPU seconds show how many cores each
run actually got. The local runner runs once as the reference for the cache equality check.

For the real cluster, each shard's time is split, from Dask's task stream and the shards' own
timings, into: scheduling (a worker thread idle between two shards while shards were waiting),
Prefect task-run bookkeeping (the Dask task's compute time minus the shard function's: creating
the task run, its state changes and result, through the API), model load (the first shard of each
worker process builds its engine) and compute. The shard size that keeps the per-shard overhead
under 2 % of a shard's compute follows. Prefect runs against one temporary server for the bench
(graft's, with its own database). On a shared machine timings are noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from photos import SMALL, make_bases, write_photos  # bench/photos.py, shared with bench/featurize.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before the graft imports: this checkout's code

from graft.params import Params, load_params, parse_params  # noqa: E402 - after sys.path points at this checkout

OVERHEAD_TARGET = 0.02  # per-shard overhead as a fraction of a shard's compute


def bench_params(
    ws: Path, backbone: str, name: str, runner: str, workers: int, shard_size: int, address: str | None = None
) -> Params:
    """The repo's params with every path inside ``ws`` and a cache of its own per run."""
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
    raw["featurize"]["dask"].update(address=address, n_workers=workers, threads_per_worker=1, decode_threads=0)
    return parse_params(raw)


def _timed_run(params: Params, client) -> dict:
    """featurize_dask on ``client``'s cluster, plus the CPU seconds its workers used and the task stream."""
    from graft.daskworker import probe
    from graft.flows.scale import featurize_dask

    client.run(probe, "featurize")  # imports torch/onnxruntime in each worker before the clock starts
    client.get_task_stream(count=0)  # starts the scheduler's task-stream recording
    cpu0, t0 = client.run(time.process_time), time.time()
    summary = featurize_dask(params)
    cpu1 = client.run(time.process_time)
    return {
        **summary,
        "worker_cpu_s": sum(cpu1[w] - cpu0[w] for w in cpu1 if w in cpu0),
        "stream": client.get_task_stream(start=t0),
    }


def local_cluster_run(params: Params) -> dict:
    """featurize_dask on a LocalCluster of ``n_workers`` x 1 thread, started here and passed by address."""
    from distributed import Client, LocalCluster

    dp = params.featurize.dask
    with (
        LocalCluster(
            n_workers=dp.n_workers, threads_per_worker=dp.threads_per_worker, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        dask = dp.model_copy(update={"address": lc.scheduler_address})
        return _timed_run(
            params.model_copy(update={"featurize": params.featurize.model_copy(update={"dask": dask})}), client
        )


def real_cluster_run(ws: Path, make: Callable[[str], Params]) -> dict:
    """featurize_dask on ``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1`` processes on 127.0.0.1."""
    from tests.dask_cluster import real_cluster

    with real_cluster(ws / "real-cluster", n_workers=2, threads=1) as cluster:
        t = time.perf_counter()
        run = _timed_run(make(cluster.address), cluster.client)
        run["cluster_s"] = time.perf_counter() - t
    return run


def split_overhead(run: dict) -> dict:
    """Per-shard seconds: scheduling, Prefect bookkeeping, model load, compute (see the module docstring)."""
    tasks = [t for t in run["stream"] if t.get("status") == "OK"]
    compute = [(t["worker"], s["start"], s["stop"]) for t in tasks for s in t["startstops"] if s["action"] == "compute"]
    n = max(1, run["shards"])
    gaps = 0.0
    for w in {w for w, _, _ in compute}:
        spans = sorted((a, b) for ww, a, b in compute if ww == w)
        gaps += sum(max(0.0, nxt[0] - cur[1]) for cur, nxt in itertools.pairwise(spans))
    dask_s = sum(b - a for _, a, b in compute)
    load = run["model_load_seconds"]
    return {
        "scheduling": gaps / n,
        "prefect": max(0.0, dask_s - run["shard_seconds"]) / n,
        "load_per_shard": load / n,
        "load_per_worker": load / max(1, run["workers"]),
        "compute": (run["shard_seconds"] - load) / n,
        "tasks": len(tasks),
    }


def _cache(root: Path) -> Path:
    return next(p for p in root.iterdir() if p.is_dir())


def _check(label: str, cmp: dict) -> str:
    ok = cmp["same_keys"] and cmp["repeated_a"] == cmp["repeated_b"] == 0 and cmp["max_abs_diff"] <= 1e-4
    return (
        f"  {label:<22} {'OK ' if ok else 'BAD'}  keys {cmp['rows_a']}/{cmp['rows_b']} same={cmp['same_keys']}, "
        f"repeated rows {cmp['repeated_a']}/{cmp['repeated_b']}, max |diff| {cmp['max_abs_diff']:.1e}"
    )


def print_overhead(real: dict, shard_size: int) -> None:
    o = split_overhead(real)
    per_image = o["compute"] / shard_size
    overhead = o["scheduling"] + o["prefect"]
    print(f"\nper-shard split on the real cluster ({real['shards']} shards of {shard_size}, {o['tasks']} Dask tasks):")
    print(f"  {'scheduling (worker idle between shards)':<44} {1000 * o['scheduling']:>8.0f} ms")
    print(f"  {'Prefect task-run bookkeeping':<44} {1000 * o['prefect']:>8.0f} ms")
    print(
        f"  {'model load (once per worker process)':<44} {1000 * o['load_per_worker']:>8.0f} ms per worker "
        f"= {1000 * o['load_per_shard']:.0f} ms per shard here"
    )
    print(
        f"  {'compute (read, decode, forward, write part)':<44} {1000 * o['compute']:>8.0f} ms "
        f"= {1000 * per_image:.1f} ms per image"
    )
    need = overhead / (OVERHEAD_TARGET * per_image) if per_image > 0 else float("nan")
    print(
        f"  overhead per shard {1000 * overhead:.0f} ms = {100 * overhead / max(o['compute'], 1e-9):.1f} % of this "
        f"shard size's compute; under {100 * OVERHEAD_TARGET:.0f} % from shard_size >= {need:.0f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=None, help="images to generate (default 600; 120 with --quick)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shard-size", type=int, default=None, help="images per shard (default: count / 12)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 120 images")
    ap.add_argument("--only-real", action="store_true", help="skip the LocalCluster runs")
    ap.add_argument("--dir", help="workspace folder to keep (default: a temporary one)")
    args = ap.parse_args()
    count = args.count or (120 if args.quick else 600)
    shard_size = args.shard_size or max(1, count // 12)  # 12 shards: 6 per worker, small imbalance at the end
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from prefect.settings import (
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    from graft.cache import compare_caches
    from graft.prefect_api import prefect_api
    from graft.tasks.featurize import featurize
    from graft.tasks.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(args.dir or tmp)
        db = f"sqlite+aiosqlite:///{Path(tmp) / 'prefect.db'}"
        with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: db}), prefect_api() as api:
            load_before = os.getloadavg()
            write_photos(ws / "raw", 0, count, make_bases(distinct=min(count, 64), large_fraction=0.0), 0.0)

            def p(name: str, runner: str = "dask", n: int = 2, address: str | None = None) -> Params:
                return bench_params(ws, args.backbone, name, runner, n, shard_size, address)

            ingest(p("cache-local", "local", 1))
            local = featurize(p("cache-local", "local", 1))
            runs = (
                {}
                if args.only_real
                else {f"LocalCluster {n} x 1 thread": local_cluster_run(p(f"cache-{n}w", n=n)) for n in (1, 2)}
            )
            real = real_cluster_run(ws, lambda address: p("cache-real", address=address))
            runs["real: scheduler + 2 worker procs"] = real
            load_after = os.getloadavg()
        print(
            f"\nscale bench: {count} JPEGs {SMALL[0]}x{SMALL[1]}, {args.backbone}, shards of {shard_size} "
            f"({real['shards']} shards), {os.cpu_count()} CPUs; Prefect API {api}; load average before "
            f"{load_before[0]:.1f}, after {load_after[0]:.1f}"
        )
        print(f"{'runner':<34} {'img/s':>7} {'compute s':>10} {'worker CPU s':>13} {'cores got':>10} {'img/CPU s':>10}")
        print(f"{'local (featurize.runner: local)':<34} {local['img_per_s']:>7.1f} {local['seconds']:>10.2f}")
        for label, r in runs.items():
            print(
                f"{label:<34} {r['img_per_s']:>7.1f} {r['seconds']:>10.2f} {r['worker_cpu_s']:>13.2f} "
                f"{r['worker_cpu_s'] / r['seconds']:>10.2f} {r['computed'] / r['worker_cpu_s']:>10.1f}"
            )
        if not args.only_real:
            one, two = runs["LocalCluster 1 x 1 thread"], runs["LocalCluster 2 x 1 thread"]
            print(
                f"throughput ratio 2 workers / 1 worker: {two['img_per_s'] / one['img_per_s']:.2f}x  (ideal 2.00x "
                f"on 2 cores); cores obtained ratio "
                f"{two['worker_cpu_s'] / two['seconds'] / (one['worker_cpu_s'] / one['seconds']):.2f}x"
            )
        print(
            "compute s: first shard submitted to last result (cluster start-up and worker imports excluded); "
            "cores got = worker CPU s / compute s"
        )
        print_overhead(real, shard_size)
        print("cache equality:")
        if not args.only_real:
            print(_check("dask 1w vs dask 2w", compare_caches(_cache(ws / "cache-1w"), _cache(ws / "cache-2w"))))
        print(_check("local vs real cluster", compare_caches(_cache(ws / "cache-local"), _cache(ws / "cache-real"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
