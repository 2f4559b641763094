"""The Prefect API a graft run reports to, and the temporary server graft starts when none is configured.

Without ``PREFECT_API_URL`` Prefect starts a temporary ("ephemeral") server in whichever process first
needs one, a Dask worker included, and stops it from an ``atexit`` hook that SIGTERM and SIGKILL skip.
graft instead starts one server per run itself, on the driver, in a child process bound to the
driver's lifetime, and points the run at it (and the Dask workers, see ``graft.flows.scale``):

    with prefect_api() as url:   # PREFECT_API_URL if set, else a temporary server on 127.0.0.1
        my_flow()                # the flow, its tasks and its Dask workers report to ``url``

The server is ``python -m graft.prefect_api``: Prefect's own app (``create_app``, as ``prefect server
start`` and the ephemeral mode serve it) under uvicorn, on a socket the driver opened. It exits when
the driver does, however the driver ends: Linux delivers SIGTERM on the parent's death
(``PR_SET_PDEATHSIG``), and a watchdog thread checks the parent pid as well (other systems, and the
moment before ``prctl`` ran).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from graft import GraftError

STARTUP_TIMEOUT_S = 180.0  # a cold start on a busy 2-core machine takes ~10-30 s (imports, migrations)
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def configured_api() -> str | None:
    """The Prefect API this process is configured for (``PREFECT_API_URL``, a profile, a test harness), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``{api_url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def reachable(api_url: str, timeout: float = 5.0) -> bool:
    """True when an HTTP server answers at ``api_url``, whatever the status (Prefect Cloud wants a key)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class TemporaryServer:
    """A Prefect server on 127.0.0.1 in a child process that never outlives this one.

    The listening socket is opened here (port 0: no race for a free port) and handed to the child,
    so ``api_url`` is known before the child starts. Start it from a thread that lives as long as
    the run (``prctl``'s parent is the thread that forked the child).
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Start the server and wait until it answers; return its API URL."""
        from prefect.settings import get_current_settings

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        # The server uses this process's settings (database, home), as Prefect's own temporary server does.
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",
        }
        env.pop("PREFECT_API_URL", None)
        root = str(Path(__file__).resolve().parents[1])
        if root not in (*site.getsitepackages(), site.getusersitepackages()):
            # A checkout run in place (tests, bench): the child imports this graft, not an installed one.
            env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, read on failure, closed in stop()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "graft.prefect_api", str(sock.fileno()), str(os.getpid())],
                pass_fds=(sock.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
            )
        finally:
            sock.close()  # the child holds its own copy
        deadline = time.monotonic() + timeout
        while not healthy(self.api_url, timeout=1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with code {self.process.returncode}"
                    if self.process.poll() is not None
                    else f"did not answer within {timeout:g} s"
                )
                tail = self._tail()
                self.stop()
                raise GraftError(
                    f"the temporary Prefect server {why}{': ' + tail if tail else ''}; "
                    f"or run `prefect server start` and set PREFECT_API_URL"
                )
            time.sleep(0.2)
        return self.api_url

    def _tail(self) -> str:
        if not self._log:
            return ""
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``) and reap it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> TemporaryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flush_prefect_clients() -> None:
    """Send the logs and events still queued in this process before their server goes (as prefect_test_harness)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # never started in this process
            logs: Any = APILogWorker.instance().drain()  # sync or async, depending on the caller
            if hasattr(logs, "__await__"):
                await logs
        events: Any = EventsWorker.drain_all()
        if hasattr(events, "__await__"):
            await events

    with contextlib.suppress(Exception):  # best effort: the run's result does not depend on its logs
        run_coro_as_sync(drain())


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API URL for a run: the configured one, the running flow's, or a temporary server's.

    With none configured, a :class:`TemporaryServer` runs for the block; ``PREFECT_API_URL`` names
    it in this process's settings and environment (so processes started meanwhile, such as a
    LocalCluster's workers, inherit it) and both are restored afterwards.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        temporary_settings,
    )

    url = configured_api()
    ctx = FlowRunContext.get()
    if url or (ctx is not None and ctx.client):  # inside a flow: its client's API, whatever started it
        yield url or str(ctx.client.api_url).rstrip("/")  # type: ignore[union-attr]  # ctx is set when url is not
        return
    if not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        raise GraftError("no Prefect API: set PREFECT_API_URL to a running server (`prefect server start`)")
    before = os.environ.get("PREFECT_API_URL")
    with TemporaryServer() as server, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            yield server.api_url
        finally:
            _flush_prefect_clients()
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


# --- the server process


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies: prctl on Linux, and a polling watchdog everywhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        time.sleep(STOP_TIMEOUT_S)
        os._exit(1)  # shutdown hung: the parent is gone, nobody else will stop us

    threading.Thread(target=watch, name="graft-parent-watchdog", daemon=True).start()


def _serve(fd: int, parent: int) -> None:
    """Serve Prefect's API on the inherited listening socket ``fd`` until SIGTERM or the parent's death."""
    _die_with_parent(parent)
    import uvicorn
    from prefect.server.api.server import create_app

    sock = socket.socket(fileno=fd)
    app = create_app(ephemeral=True, final=True)  # ephemeral: API only, no UI, no background services
    uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on")).run(sockets=[sock])


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
