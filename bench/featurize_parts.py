"""bench/featurize.py's measuring parts: a timer, the seed-style per-image loop, the engine's forward-only
roofline, featurize in a fresh interpreter for its peak RSS, and seeding a workspace with an exported engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the graft imports below (inside functions) use this checkout's code


def timed(fn, *a, **k) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


# --- (a) the seed-style per-image loop


def per_image_loop(bb, paths: list[Path]) -> tuple[float, float]:
    """img/s of the classic loop (PIL open/convert, resize + crop, torch eager forward at batch 1),
    and of its forward pass alone."""
    import torch
    from PIL import Image

    from graft.images import preprocess

    model = bb.model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("RGB")  # full-size decode, no draft, no EXIF rotation
            x = torch.from_numpy(preprocess(img, bb.preprocess))[None]
            model(x)
        loop = len(paths) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(len(paths) // 2):
            model(x)
        forward = (len(paths) // 2) / (time.perf_counter() - t0)
    return loop, forward


# --- (c) the engine's forward-only roofline


def roofline(engine, batches: list[np.ndarray], n_batches: int) -> float:
    """img/s of ``engine`` alone on pre-decoded batches, with as many calls in flight as it has streams."""
    work = [batches[i % len(batches)] for i in range(n_batches)]
    engine(work[0])  # warm-up
    t0 = time.perf_counter()
    if engine.streams > 1:
        with ThreadPoolExecutor(engine.streams) as pool:
            n = sum(len(f) for f in pool.map(engine, work))
    else:
        n = sum(len(engine(x)) for x in work)
    return n / (time.perf_counter() - t0)


# --- peak RSS in a subprocess

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this 2-3 GB process).
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from graft.params import load_params
from graft.tasks.featurize import featurize

def hwm_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

params = load_params(sys.argv[1])
start = hwm_kb()  # after the imports: torch, onnxruntime, pyarrow, pandas
summary = featurize(params)
print(json.dumps({"summary": summary, "rss_start_kb": start, "rss_peak_kb": hwm_kb()}))
"""


def rss_run(ws: Path) -> dict:
    """Run featurize in a fresh interpreter; return its summary and peak RSS (KiB)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ws / "params.yaml"), str(REPO)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"featurize subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seed_engine_file(src_cache: Path, ws: Path) -> None:
    """Copy the exported backbone.onnx (and meta.json) into a workspace's cache: export is once per fingerprint."""
    dst = ws / "cache" / src_cache.name
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", "backbone.onnx"):
        if (src_cache / name).exists():
            shutil.copy2(src_cache / name, dst / name)
