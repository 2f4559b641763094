"""What runs inside a Dask worker process: who it is, the models it keeps, the Prefect API it reports to.

Shared by the shard tasks (:mod:`graft.tasks.shard`) and the scale-out flows (:mod:`graft.flows.scale`):
each worker builds a model once per run and keeps it for later shards, and during a run every worker is
pointed at the driver's Prefect API (never a temporary server of its own).
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from graft import GraftError

LOADS: Counter = Counter()  # engine / model builds in this process, by kind ("featurize", "predict")
_KEEPMODELS = 2  # models kept per worker process: a run's, plus one from an overlapping run


def attempt() -> int:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1)


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # not inside a Dask worker (tests call shards directly)
        return f"pid-{os.getpid()}"


def worker_threads() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError):
        return 1


class _ModelCache:
    """Per-process models keyed by what determines them, built once under a lock (Dask threads share them)."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, kind: str, build: Callable[[], Any]) -> Any:
        with self._lock:  # a second thread of this worker waits for the first build instead of repeating it
            if key not in self._items:
                self._items[key] = build()
                LOADS[kind] += 1
                while len(self._items) > _KEEPMODELS:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


MODELS = _ModelCache()


def load_counts() -> dict[str, int]:
    """Models built by this process so far (gathered from each worker with ``client.run``)."""
    return dict(LOADS)


def probe(kind: str, api_url: str | None = None) -> dict:
    """Run on every worker before the shards: imports what the shards need, checks the Prefect API, says who it is."""
    import importlib

    import graft
    from graft.prefect_api import reachable

    for module in ("graft.engine" if kind == "featurize" else "graft.predict", "onnxruntime"):
        importlib.import_module(module)  # here, once per worker, rather than inside the first shard
    if api_url and not reachable(api_url, timeout=10.0):
        raise GraftError(
            f"Dask worker {worker_name()} cannot reach the driver's Prefect API at {api_url}: run a "
            f"Prefect server the workers can reach and set PREFECT_API_URL to it (see docs/scale.md)"
        )
    return {"graft": graft.__version__, "pid": os.getpid(), "threads": worker_threads()}


class PrefectApiPlugin(WorkerPlugin):
    """Points a Dask worker at the driver's Prefect API for one run, and forbids it a server of its own.

    Dask applies a registered plugin to every worker, including one the nanny restarts after a
    crash; unregistering it (after the run) restores the worker's previous environment.
    """

    name = "graft-prefect-api"  # one at a time: a second run's registration replaces the first's
    _VARS = ("PREFECT_API_URL", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self._before: dict[str, str | None] = {}

    @staticmethod
    def _apply(env: dict[str, str | None]) -> None:
        from prefect import context

        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        refresh = getattr(context, "refresh_global_settings_context", None)  # settings were read at import
        if refresh:
            refresh()

    def setup(self, worker: Any = None) -> None:
        self._before = {k: os.environ.get(k) for k in self._VARS}
        self._apply({"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"})

    def teardown(self, worker: Any = None) -> None:
        self._apply(self._before)
