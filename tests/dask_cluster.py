"""A real Dask cluster on 127.0.0.1 for tests and ``bench/scale.py``: ``dask scheduler`` and ``dask worker`` processes.

Not a ``LocalCluster``: the processes are started from the command line, as a user would start
them, with their own environment. Every process started here, and everything those start, carries
a marker variable in its environment, so :func:`marked` finds any of them left behind (re-parented
to PID 1 or not) and :func:`real_cluster` stops them all, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARK = "GRAFT_TEST_PROCESS_MARK"
DASK = str(Path(sys.executable).with_name("dask"))  # the venv's console script, as a user would run it
SERVER_SIGNS = ("graft.prefect_api", "uvicorn", "prefect server")  # graft's temporary server, Prefect's own


def marked(mark: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``MARK=mark`` (started by us, directly or not)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def is_server(p: psutil.Process) -> bool:
    """True when ``p`` is a Prefect API server (graft's temporary one or Prefect's ephemeral one)."""
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        return any(s in cmd for s in SERVER_SIGNS)
    return False


def _stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group we started ``proc`` in, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Cluster:
    """A running loopback cluster: its scheduler address, a client, and the environment its processes share."""

    address: str
    client: object
    env: dict
    mark: str
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, args: list[str], log: str, **kwargs) -> subprocess.Popen:
        """Start another process (e.g. the driver) with the cluster's environment, in its own process group."""
        out = open(self.workdir / log, "ab")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(
            args,
            env=kwargs.pop("env", self.env),
            cwd=kwargs.pop("cwd", REPO),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)


def cluster_env(workdir: Path, extra: dict | None = None) -> dict:
    """The environment of a fresh shell on a cluster host: no Prefect API configured, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            MARK: uuid.uuid4().hex,
        }
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def real_cluster(
    workdir: Path, n_workers: int = 2, threads: int = 1, env: dict | None = None, timeout: float = 120.0
) -> Iterator[Cluster]:
    """``dask scheduler`` + ``dask worker --nworkers N --nthreads T`` on 127.0.0.1; all stopped on exit.

    Args:
        workdir: logs, the scheduler file and the workers' scratch space go here.
        env: the processes' environment (default :func:`cluster_env`); it must carry ``MARK``.
    """
    from distributed import Client

    workdir.mkdir(parents=True, exist_ok=True)
    env = env or cluster_env(workdir)
    sched_file = workdir / "scheduler.json"
    cluster = Cluster("", None, env, env[MARK], workdir)
    client = None
    try:
        cluster.popen(
            [
                DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + timeout
        while not sched_file.exists() or not sched_file.read_text().strip():
            if time.monotonic() > deadline or cluster.procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: {(workdir / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.1)
        cluster.address = json.loads(sched_file.read_text())["address"]
        cluster.popen(
            [
                DASK,
                "worker",
                cluster.address,
                "--host",
                "127.0.0.1",
                "--nworkers",
                str(n_workers),
                "--nthreads",
                str(threads),
                "--no-dashboard",
                "--memory-limit",
                "0",
                "--local-directory",
                str(workdir / "dask-scratch"),
            ],
            "workers.log",
        )
        client = Client(cluster.address, timeout=timeout)
        client.wait_for_workers(n_workers, timeout=timeout)
        cluster.client = client
        yield cluster
    finally:
        if client is not None:
            client.close()
        for proc in reversed(cluster.procs):  # the driver (if any), the workers, then the scheduler
            _stop_group(proc)
