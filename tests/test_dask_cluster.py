"""Scale-out on a real cluster: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, a driver process.

The driver is ``python -m graft.flows.scale`` with no Prefect API configured, as on a fresh host:
graft starts a temporary Prefect server for the run, the workers report their shard task runs to
it (never to servers of their own), a worker SIGKILLed inside a shard is replaced and its shard
redone elsewhere, and once everything is stopped no process started here is left. Also: the
temporary server dies with its driver on SIGTERM and SIGKILL. Tiny CNN, 60 small images.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from graft import GraftError
from tests.dask_cluster import MARK, cluster_env, is_server, marked, real_cluster

# the ``dataset`` fixture (60 ingested images and a local featurize of them) is shared with test_scale
from tests.test_scale import (
    FlakyFSPlugin,
    _assert_same_cache,
    _cache,
    _dask_params,
    dataset,  # noqa: F401  (a pytest fixture)
)

TOL = 1e-5


def _task_runs(db: Path) -> list[tuple[str, str]]:
    """(name, state) of every task run in a Prefect server's SQLite database."""
    with sqlite3.connect(db) as con:
        return con.execute("SELECT name, state_type FROM task_run").fetchall()


class ProcessWatch:
    """Samples the marked processes during a run: every Prefect server seen, with its parent."""

    def __init__(self, mark: str) -> None:
        self.mark, self.servers, self._stop = mark, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in marked(self.mark):
                if is_server(p):
                    with contextlib.suppress(psutil.Error):
                        self.servers.setdefault(p.pid, (p.ppid(), " ".join(p.cmdline())))
            self._stop.wait(0.3)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.slow
def test_real_cluster_reports_to_driver_api_and_survives_a_killed_worker(dataset, tmp_path: Path) -> None:  # noqa: F811
    """Real processes: features equal the local run's, a killed worker loses and repeats nothing, nothing left."""
    root, reference = dataset
    env = cluster_env(tmp_path / "workers")  # the workers' own PREFECT_HOME: a server there would leave a DB
    hang = sorted(p.name for p in (root / "raw/dog").glob("*.png"))[5]
    reads, markers = tmp_path / "reads.log", tmp_path / "markers"
    markers.mkdir()
    params = _dask_params(root, "cache-real", shard_size=4, data_root=f"flaky://{root / 'raw'}")
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
    driver_home = tmp_path / "driver-home"
    killed: dict = {}

    with real_cluster(tmp_path / "cluster", env=env) as cluster:
        cluster.client.register_plugin(FlakyFSPlugin(str(markers), hang=hang, read_log=str(reads)))
        before = cluster.worker_pids()

        def kill_the_stuck_worker() -> None:
            marker, deadline = markers / f"hang-{hang}", time.monotonic() + 150
            while time.monotonic() < deadline and "pid" not in killed:
                text = marker.read_text() if marker.exists() else ""
                if text.endswith("\n"):  # a worker is blocked inside its shard, reading ``hang``
                    killed["pid"] = int(text)
                    time.sleep(0.5)
                    killed["parts_before"] = len(list((root / "cache-real").glob("*/part-shard-*.parquet")))
                    os.kill(killed["pid"], signal.SIGKILL)
                time.sleep(0.02)

        killer = threading.Thread(target=kill_the_stuck_worker, daemon=True)
        with ProcessWatch(cluster.mark) as watch:
            killer.start()
            driver = cluster.popen(
                [sys.executable, "-m", "graft.flows.scale", "--params", str(params_path), "--address", cluster.address],
                "driver.log",
                env={**env, "PREFECT_HOME": str(driver_home)},
            )
            rc = driver.wait(240)
            killer.join(5)
        log = (cluster.workdir / "driver.log").read_text(errors="replace")
        assert rc == 0, log[-3000:]
        summary = json.loads([ln for ln in log.splitlines() if ln.startswith('{"featurize"')][-1])["featurize"]
        # the plugin that pointed the workers at the driver's API is gone with the run
        assert set(cluster.client.run(lambda: os.environ.get("PREFECT_API_URL")).values()) == {None}
        after = cluster.worker_pids()

    # one Prefect server in the whole run: the driver's (none on a worker, none left by Prefect itself)
    assert len(watch.servers) == 1, watch.servers
    ((server_parent, server_cmd),) = watch.servers.values()
    assert server_parent == driver.pid and "graft.prefect_api" in server_cmd
    # every shard's task run reached that server, once per shard, and completed
    runs = _task_runs(driver_home / "prefect.db")
    shard_runs = sorted(name for name, state in runs if name.startswith("featurize-shard-"))
    assert len(shard_runs) == len(set(shard_runs)) == summary["shards"] == 15
    assert {state for name, state in runs if name.startswith("featurize-shard-")} == {"COMPLETED"}
    assert not list((tmp_path / "workers").rglob("*.db"))  # no worker-side server made a database

    # a worker was killed inside a shard, mid-run; the shard was redone by another worker process
    assert killed and killed["pid"] in before.values() and killed["pid"] not in after.values()
    assert killed["parts_before"] < 15
    readers = {int(pid) for pid, name in (ln.split(" ", 1) for ln in reads.read_text().splitlines()) if name == hang}
    assert readers - {killed["pid"]}, "the stuck shard was not redone elsewhere"
    # each key once, values as the local runner's; features.parquet too
    assert summary["computed"] == 60 and summary["workers"] == 2
    assert len(list(_cache(root / "cache-real").glob("part-*.parquet"))) == 15
    _assert_same_cache(reference, _cache(root / "cache-real"))
    local = pd.read_parquet(root / "data/features.parquet").set_index("sha256")
    ours = pd.read_parquet(params.featurize.out).set_index("sha256")
    assert sorted(local.index) == sorted(ours.index) and ours.index.is_unique
    assert np.abs(np.stack(local.loc[ours.index, "feature"]) - np.stack(ours["feature"])).max() <= TOL

    # nothing started here is left: no scheduler, worker, driver or Prefect server, re-parented or not
    deadline = time.monotonic() + 15
    while marked(cluster.mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marked(cluster.mark), [(p.pid, p.cmdline()) for p in marked(cluster.mark)]


def _alive(p: psutil.Process) -> bool:
    """Running, not merely a zombie waiting for init to reap it."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


HOLD = """
import os, sys, time
from graft.prefect_api import prefect_api
with prefect_api() as url:
    print(url, flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow, id="SIGTERM"),  # ~15 s each
        pytest.param(signal.SIGKILL, id="SIGKILL"),
    ],
)
def test_temporary_server_dies_with_its_driver(tmp_path: Path, sig: signal.Signals) -> None:
    """The server graft starts when no API is configured exits when the process that started it is killed."""
    from graft.prefect_api import healthy

    env = cluster_env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and healthy(url), url
        (server,) = psutil.Process(proc.pid).children()
        assert is_server(server)
        os.kill(proc.pid, sig)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), "the temporary server outlived its driver"
        assert not healthy(url, timeout=1.0)
        assert not marked(env[MARK])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in marked(env[MARK]):
            p.kill()


def test_worker_that_cannot_reach_the_api_is_a_clear_error() -> None:
    """A worker's probe checks the driver's Prefect API: an unreachable one is named in one line."""
    from graft.daskworker import probe

    with pytest.raises(GraftError, match=r"cannot reach the driver's Prefect API at http://127.0.0.1:9/api") as exc:
        probe("predict", "http://127.0.0.1:9/api")
    assert len(str(exc.value).splitlines()) == 1


def test_worker_plugin_sets_the_api_and_restores_the_environment() -> None:
    """What the plugin does in each worker process: the driver's API, no ephemeral servers; undone on removal."""
    from prefect import context

    from graft.daskworker import PrefectApiPlugin

    names = ("PREFECT_API_URL", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")
    saved, saved_global = {k: os.environ.pop(k, None) for k in names}, context.GLOBAL_SETTINGS_CONTEXT
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    context.refresh_global_settings_context()
    try:
        plugin = PrefectApiPlugin("http://127.0.0.1:4321/api")
        plugin.setup()
        try:
            assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
            settings = context.GLOBAL_SETTINGS_CONTEXT.settings  # what Prefect code outside a task's context reads
            assert settings.api.url == "http://127.0.0.1:4321/api" and settings.server.ephemeral.enabled is False
        finally:
            plugin.teardown()
        assert "PREFECT_API_URL" not in os.environ and os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "true"
        settings = context.GLOBAL_SETTINGS_CONTEXT.settings
        assert settings.api.url is None and settings.server.ephemeral.enabled is True
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        context.GLOBAL_SETTINGS_CONTEXT = saved_global  # e.g. a session's test harness, as it was
