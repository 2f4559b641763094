"""Scale-out flows: featurize and predict as one Prefect task per shard on a Dask cluster (prefect-dask).

The flow runs on the driver (the machine that sees the manifest): it plans the shards, checks the
workers, submits every shard through Prefect's ``DaskTaskRunner`` and gathers the small results.
The shards themselves (:mod:`graft.tasks.shard`) run on the Dask workers. With ``featurize.dask.address``
graft uses that scheduler; without one a ``distributed.LocalCluster`` is started for the run and
closed after it. No cluster is started when every image is already in the cache.

Every shard's task run reports to the driver's Prefect API: ``PREFECT_API_URL``, or else a temporary
server that graft starts for the run and that dies with the driver (:mod:`graft.prefect_api`). For the
run, a Dask worker plugin sets that URL on every worker (restarted ones included) and turns Prefect's
ephemeral mode off there, so no worker ever starts a server of its own.

    python -m graft.flows.scale --params params.yaml [--address tcp://scheduler:8786]   # featurize on a Dask cluster
    graft predict FOLDER --dask [--address ADDR] --model models/model.onnx --out preds.parquet
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner

from graft import GraftError
from graft.daskworker import PrefectApiPlugin, probe
from graft.lock import cache_lock, workspace_lock
from graft.params import DaskParams, Params, load_params
from graft.predict import list_targets, write_predictions
from graft.prefect_api import prefect_api
from graft.tasks.shard import (
    PredictJob,
    featurize_shard,
    finish_featurize,
    make_shards,
    plan_featurize,
    predict_shard,
)

WORKER_WAIT_S = 60.0  # a scheduler with no workers would otherwise hold the shards forever


def task_runner(dp: DaskParams) -> TaskRunner[Any]:
    """Prefect's Dask runner for the params: the given scheduler, or a LocalCluster of worker processes."""
    if dp.address:
        return DaskTaskRunner(address=dp.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": dp.n_workers,
            "threads_per_worker": dp.threads_per_worker,
            "processes": True,  # one engine per process, no GIL sharing between workers
            "dashboard_address": ":0",  # a free port: several clusters may run on one shared machine
        },
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _run_api() -> str:
    """The API URL the running flow reports to (the shards must report there too)."""
    ctx = FlowRunContext.get()
    if ctx is None:
        raise GraftError("the scale-out flows run inside a Prefect flow (use featurize_dask / predict_dask)")
    return str(ctx.client.api_url).rstrip("/")


@contextlib.contextmanager
def cluster_workers(kind: str) -> Iterator[dict[str, int]]:
    """The running flow's Dask workers ({address: threads}), pointed at its Prefect API for the block.

    Fails early, with one line, when the scheduler is unreachable, has no workers, a worker lacks
    graft, or a worker cannot reach the driver's Prefect API.
    """
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    if not isinstance(runner, DaskTaskRunner):
        raise GraftError("the scale-out flows need Prefect's DaskTaskRunner (use featurize_dask / predict_dask)")
    where = runner.address or "a new LocalCluster"
    try:
        client = runner.client
    except OSError as exc:
        raise GraftError(f"cannot reach the Dask scheduler at {where} ({_first_line(exc)})") from None
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise GraftError(f"the Dask scheduler at {where} has no workers after {WORKER_WAIT_S:g} s") from None
    api = _run_api()
    client.register_plugin(PrefectApiPlugin(api))
    try:
        try:
            client.run(probe, kind, api)  # also takes the torch / onnxruntime import off the timed path
        except GraftError as exc:
            raise GraftError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any other failure here means a worker cannot run graft
            raise GraftError(
                f"a Dask worker cannot run graft {kind} shards ({_first_line(exc)}): install graft, "
                f"the same version, on every worker"
            ) from None
        yield dict(client.nthreads())
    finally:
        with contextlib.suppress(Exception):  # a lost scheduler must not hide the run's own error
            client.unregister_worker_plugin(PrefectApiPlugin.name)


def gather(futures: list[PrefectFuture[Any]]) -> list[Any]:
    """Every shard's result; after all have settled, one error for the failed ones (finished parts stay)."""
    wait(futures)
    results, errors = [], []
    for f in futures:
        try:
            results.append(f.result())
        except Exception as exc:  # noqa: BLE001 - collected, then reported together
            errors.append(exc)
    if len(errors) == 1 and isinstance(errors[0], GraftError):
        raise errors[0]
    if errors:
        raise GraftError(
            f"{len(errors)} of {len(futures)} shards failed after retries; the finished ones are "
            f"kept, rerun to resume; first: {_first_line(errors[0])}"
        )
    return results


@flow(name="graft-featurize-dask", log_prints=True)
def featurize_dask_flow(params: Params) -> dict:
    """Fill the feature cache with one Prefect task per shard on the Dask runner, then write features.parquet."""
    t_start = time.perf_counter()
    fp = params.featurize
    log = get_run_logger()
    results: list[dict] = []
    workers: dict[str, int] = {}
    seconds = 0.0
    plan = plan_featurize(params)  # the caller holds the cache lock (graft.stages.run_stage, featurize_cluster)
    if plan.shards:
        with cluster_workers("featurize") as workers:
            log.info(
                "%d images in %d shards on %d Dask workers (%d threads), Prefect API %s",
                sum(len(s.items) for s in plan.shards),
                len(plan.shards),
                len(workers),
                sum(workers.values()),
                _run_api(),
            )
            shard = featurize_shard.with_options(retries=fp.dask.retries)
            t0 = time.perf_counter()
            results = gather([shard.submit(plan.job, s) for s in plan.shards])
            seconds = time.perf_counter() - t0
    finish_featurize(plan, fp.out)
    # Every planned key is in the cache now. Counting shard results instead would miss a finished shard
    # whose result died with its worker: Dask reruns it, and the rerun finds its part and computes 0.
    computed = sum(len(s.items) for s in plan.shards)
    engines = sorted({r["engine"] for r in results if r["engine"]})
    return {
        "backbone": plan.cache.name,
        "fingerprint": plan.cache.fingerprint,
        "engine": ",".join(engines) or None,
        "runner": "dask",
        "images": len(plan.cache.shas),
        "computed": computed,
        "from_cache": len(plan.cache.shas) - computed,
        "shards": len(plan.shards),
        "workers": len(workers),
        "retried_shards": sum(r["attempt"] > 1 for r in results),
        "seconds": round(seconds, 2),
        "img_per_s": round(computed / seconds, 1) if computed else None,
        "shard_seconds": round(sum(r["seconds"] for r in results), 3),  # inside the shard functions
        "model_load_seconds": round(sum(r.get("load_s", 0.0) for r in results), 3),
        "stage_seconds": round(time.perf_counter() - t_start, 2),
        "cache": plan.job.cache,
    }


def featurize_dask(params: Params) -> dict:
    """Featurize on ``params.featurize.dask`` (the target of ``featurize.runner: dask``); a summary as featurize's.

    Runs against ``PREFECT_API_URL``, or a temporary server that lives as long as this call.
    """
    with prefect_api():
        return featurize_dask_flow.with_options(task_runner=task_runner(params.featurize.dask))(params)


@flow(name="graft-predict-dask", log_prints=True)
def predict_dask_flow(
    target: str, model: str, out: str, shard_size: int = 512, batch_size: int = 32, retries: int = 2
) -> dict:
    """Classify every image under ``target`` with one Prefect task per shard; write one Parquet of predictions."""
    t0 = time.perf_counter()
    if "://" not in target:
        target = str(Path(target).resolve())  # workers do not share the driver's working directory
    if not Path(model).is_file():
        raise GraftError(f"model {model} not found: run the export stage or pass --model")
    urls = list_targets(target)
    if not urls:
        raise GraftError(f"no image files under {target}")
    shards = make_shards([(u, u) for u in urls], shard_size)
    task = predict_shard.with_options(retries=retries)
    job = PredictJob(str(Path(model).resolve()), batch_size)
    with cluster_workers("predict") as workers:
        records = [r for shard_records in gather([task.submit(job, s) for s in shards]) for r in shard_records]
    write_predictions(records, out)
    bad = sum(r["error"] is not None for r in records)
    return {
        "images": len(records),
        "predicted": len(records) - bad,
        "unreadable": bad,
        "shards": len(shards),
        "workers": len(workers),
        "seconds": round(time.perf_counter() - t0, 2),
        "out": str(out),
    }


def predict_dask(
    target: str, model: str, out: str, dask: DaskParams | None = None, shard_size: int = 512, batch_size: int = 32
) -> dict:
    """``graft predict --dask``: :func:`predict_dask_flow` on the given Dask cluster (a LocalCluster by default)."""
    dask = dask or DaskParams()
    if not str(out).endswith(".parquet"):
        raise GraftError(f"--out {out}: predictions over a cluster are written as Parquet; name it *.parquet")
    with prefect_api():
        return predict_dask_flow.with_options(task_runner=task_runner(dask))(
            target, model, out, shard_size, batch_size, dask.retries
        )


@flow(name="graft-featurize-cluster", log_prints=True)
def featurize_cluster(params_path: str = "params.yaml", address: str | None = None) -> dict:
    """Deployable entry point: featurize ``params_path`` on its Dask cluster (or ``address``), whatever
    ``featurize.runner`` says.

    Holds the workspace lock, as every stage command does; the Dask work runs as a subflow with the
    ``DaskTaskRunner`` built from params (a deployment's own task runner is not configurable per run).
    """
    params = load_params(params_path)
    if address:
        dask = params.featurize.dask.model_copy(update={"address": address})
        params = params.model_copy(update={"featurize": params.featurize.model_copy(update={"dask": dask})})
    with workspace_lock(params_path), cache_lock(params.featurize.cache_dir):
        return featurize_dask(params)


def main(argv: list[str] | None = None) -> int:
    """``python -m graft.flows.scale``: featurize on the params' Dask cluster, whatever ``featurize.runner`` says."""
    ap = argparse.ArgumentParser(prog="python -m graft.flows.scale", description=main.__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--address", help="Dask scheduler address (overrides featurize.dask.address)")
    args = ap.parse_args(argv)
    try:
        with prefect_api():  # the flow itself needs the API: start graft's server first, not Prefect's own
            print(json.dumps({"featurize": featurize_cluster(args.params, args.address)}))
    except GraftError as exc:
        print(f"graft: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
