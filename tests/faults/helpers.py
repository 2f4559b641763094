"""Helpers for the fault suite: bad-file generators, workspaces, and running the real CLI."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from graft.lock import ENV_HELD
from graft.params import Params
from graft.tasks.ingest import ingest
from tests.helpers import REPO, class_image, make_params

ONE_THREAD = {"featurize": {"threads": 1, "workers": 1}, "train": {"finetune": {"threads": 1, "workers": 1}}}


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Encode ``img`` in memory."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def truncated_jpeg(seed: int = 3) -> bytes:
    """A noise JPEG cut in half: Image.open succeeds, only the full decode fails."""
    arr = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr, "RGB"), "JPEG", quality=90)
    return data[: len(data) // 2]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (IHDR, one IDAT, IEND): any header, any bit depth Pillow cannot write itself."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_bytes(label_index: int, i: int, size: tuple[int, int] = (40, 32)) -> bytes:
    return encode(class_image(label_index, i, size), "PNG")


def params_for(ws: Path, overrides: dict | None = None) -> Params:
    """``make_params`` for ``ws`` with one torch thread everywhere (comparable across processes)."""
    from tests.helpers import _merge

    return make_params(ws, _merge(ONE_THREAD, overrides or {}))


def write_params(ws: Path, params: Params) -> Path:
    """Dump ``params`` as ``ws/params.yaml`` (the CLI's input; its folder is the workspace)."""
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    return path


def run_ingest(ws: Path, overrides: dict | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Ingest ``ws/raw``; return the summary, the manifest and the quarantine table."""
    summary = ingest(params_for(ws, overrides))
    return summary, pd.read_parquet(ws / "data/manifest.parquet"), read_quarantine(ws)


def read_quarantine(ws: Path) -> pd.DataFrame:
    return pd.read_csv(ws / "data/quarantine.csv", dtype=str, keep_default_na=False)


def reasons(q: pd.DataFrame) -> dict[str, str]:
    return dict(zip(q["path"], q["reason"], strict=True))


def graft_env() -> dict[str, str]:
    """The environment for a graft subprocess: this checkout importable, quiet progress bars, one thread."""
    env = {k: v for k, v in os.environ.items() if k != ENV_HELD}  # an unrelated run, not a child of a lock holder
    return {**env, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def graft_cmd(*args: str, slow: float | None = None) -> list[str]:
    """``python -m graft.cli ARGS``; with ``slow``, through tests.faults.slow_cli (each atomic publish waits)."""
    if slow is None:
        return [sys.executable, "-m", "graft.cli", *args]
    return [sys.executable, "-m", "tests.faults.slow_cli", str(slow), *args]


class GraftProcess(subprocess.Popen):
    """A graft CLI subprocess whose output goes to the file ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path):
        self.log_path = log_path
        with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own descriptor
            super().__init__(args, cwd=cwd, env=graft_env(), stdout=log, stderr=subprocess.STDOUT)


def start_graft(*args: str, cwd: Path, slow: float | None = None) -> GraftProcess:
    """Start the real ``graft`` CLI in a subprocess; its output goes to a log file read by :func:`output_of`."""
    return GraftProcess(graft_cmd(*args, slow=slow), cwd / f"graft-{time.monotonic_ns()}.log", cwd)


def output_of(proc: GraftProcess) -> str:
    """Everything a process started by :func:`start_graft` printed so far."""
    return proc.log_path.read_text(encoding="utf-8")


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll ``condition`` every 20 ms; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(0.02)


def tmp_files(folder: Path) -> list[Path]:
    """graft.atomic's temporary files (``.<name>.<random>.tmp``) under ``folder``."""
    return sorted(p for p in folder.rglob(".*.tmp"))
