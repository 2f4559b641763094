"""Deployments against a real local Prefect server: served, triggered, completed, never overlapping."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, make_params, write_tree

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


TRIGGER = """
import json, sys, time
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client
runs = [run_deployment("graft-pipeline/graft-pipeline", timeout=0) for _ in range(2)]
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = [client.read_flow_run(r.id) for r in runs]
        if all(s.state.is_final() for s in states):
            break
        time.sleep(1)
    print(json.dumps([{"state": s.state.type.value, "start": s.start_time.timestamp(), "end": s.end_time.timestamp()}
                      for s in states]))
"""


def test_served_deployment_runs_to_completion_one_at_a_time(tmp_path: Path) -> None:
    """Two runs triggered at once both complete, the second starting after the first ended."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }
    ws = tmp_path / "ws"
    (ws / "raw").mkdir(parents=True)
    write_tree(ws / "raw", per_class=8)
    params_path = ws / "params.yaml"
    params_path.write_text(yaml.safe_dump(make_params(ws).model_dump()))

    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for(lambda: _healthy(api), 120, "the Prefect server")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "graft.flows.deploy", "--params", str(params_path), "--cron", "0 0 1 1 *"],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

        def listed() -> bool:
            ls = [sys.executable, "-m", "prefect", "deployment", "ls"]
            return "graft-pipeline" in subprocess.run(ls, env=env, capture_output=True, text=True).stdout

        _wait_for(listed, 120, "the served deployments")
        out = subprocess.run([sys.executable, "-c", TRIGGER], env=env, capture_output=True, text=True, timeout=700)
        assert out.returncode == 0, out.stderr[-2000:]
        runs = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"]
    first, second = sorted(runs, key=lambda r: r["start"])
    assert second["start"] >= first["end"] - 0.5  # concurrency limit 1: queued, not overlapping
    assert (ws / "models/model.onnx").is_file()
