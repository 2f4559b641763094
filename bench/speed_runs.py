"""bench/train_speed.py's runs: the photo-like images, a workspace per row, and whole ``graft`` processes (train,
featurize, the light commands) timed from outside; the demo's fp32/bf16 accuracy runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_images(root: Path, classes: int, per_class: int, size: tuple[int, int] = (320, 256)) -> None:
    """Photo-like JPEGs: class k = random crops of scikit-image photo k, recoloured and noised."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    sources += [np.stack([g] * 3, -1) for g in (data.camera(), data.moon(), data.brick(), data.grass(), data.gravel())]
    rng = np.random.default_rng(0)
    w, h = size
    for k in range(classes):
        src = sources[k % len(sources)]
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            crop = Image.fromarray(np.ascontiguousarray(src[..., :3])).resize((w * 2, h * 2))
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            arr = np.asarray(crop.crop((x0, y0, x0 + w, y0 + h)), np.float32)
            arr = arr * rng.uniform(0.7, 1.3, 3) + rng.normal(0, 8, arr.shape)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"c{k}" / f"{i:04d}.jpg", quality=90)


def child_env(*paths: Path) -> dict[str, str]:
    """This environment with ``paths`` (then this checkout) first on a child process's PYTHONPATH."""
    entries = [*map(str, paths), str(REPO), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, entries))}


def run_cli(args: list[str], cwd: Path) -> tuple[float, dict | str]:
    """Wall seconds of a fresh ``graft`` process and its --json summary (or its output)."""
    env = child_env()
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "graft.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"graft {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    try:
        return wall, json.loads(last)
    except json.JSONDecodeError:
        return wall, done.stdout


def default_epochs() -> int:
    """params.yaml's fine-tune epochs: graft runs train as long as a default run, so per-run costs weigh as in use."""
    return int(yaml.safe_load((REPO / "params.yaml").read_text())["train"]["finetune"]["epochs"])


def workspace(ws: Path, data_root: Path, train: dict | None = None, featurize: dict | None = None) -> Path:
    """A params file in ``ws`` over ``data_root`` with overrides; returns its path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(data_root)
    for section, over in (("train", train or {}), ("featurize", featurize or {})):
        for k, v in over.items():
            if isinstance(v, dict):
                raw[section].setdefault(k, {}).update(v)
            else:
                raw[section][k] = v
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return ws / "params.yaml"


def graft_train(
    ws: Path, data_root: Path, size: int, epochs: int, precision: str, strategy: dict, table: bool = True
) -> dict:
    """One whole ``graft train`` (finetune) process; img/s = training images x epochs run / wall seconds. ``table``:
    after ``graft featurize`` at the same size, as ``dvc repro`` runs them (the LP-FT probe then reads its features
    from the feature table); else without a feature table (the probe computes them)."""
    params = workspace(
        ws,
        data_root,
        train={
            "mode": "finetune",
            "finetune": {"image_size": size, "epochs": epochs, "patience": 100, "precision": precision, **strategy},
        },
        featurize={"image_size": size},
    )
    if not (ws / "data" / "manifest.parquet").is_file():
        run_cli(["ingest", "--params", str(params)], ws)
    features = ws / "data" / "features.parquet"
    if table and not features.is_file():
        run_cli(["featurize", "--params", str(params)], ws)
    elif not table:
        features.unlink(missing_ok=True)
    wall, summary = run_cli(["train", "--params", str(params), "--fresh", "--json"], ws)
    s = summary["train"] if isinstance(summary, dict) else {}
    images = s["train_images"] * s["epochs"]
    return {
        "wall_s": wall,
        "img_per_s": images / wall,
        "precision": precision,
        "val_accuracy": s["val_accuracy"],
        "epochs": s["epochs"],
        "probe_features": s.get("probe_features"),
    }


def featurize_speed(ws: Path, data_root: Path, precision: str) -> dict:
    """A fresh-cache ``graft featurize`` (onnxruntime): img/s of the computed part and the engine's one-off set-up."""
    params = workspace(ws, data_root, featurize={"precision": precision, "engine": "onnxruntime"})
    shutil.rmtree(ws / "cache", ignore_errors=True)  # fresh, also where --dir keeps an earlier run's workspace
    run_cli(["ingest", "--params", str(params)], ws)
    wall, summary = run_cli(["featurize", "--params", str(params), "--json"], ws)
    s = summary["featurize"] if isinstance(summary, dict) else {}
    return {
        "img_per_s": s["img_per_s"],
        "wall_s": wall,
        "setup_s": wall - s["seconds"],
        "computed": s["computed"],
        "fingerprint": s["fingerprint"],
    }


def startup(ws: Path) -> dict[str, float]:
    """Best-of-3 wall seconds of the light commands as fresh processes (``ws`` holds a fully cached featurize)."""
    metrics = ws / "metrics.json"
    row = {"accuracy": 0.9, "macro_f1": 0.9, "balanced_accuracy": 0.9, "ece": 0.05, "n": 10}
    metrics.write_text(json.dumps({**row, "baseline": row}))
    commands = {
        "graft --help": ["--help"],
        "graft backbones": ["backbones"],
        "graft metrics": ["metrics", "--path", str(metrics)],
        "graft featurize (cached)": ["featurize", "--params", "params.yaml"],
        "python -c pass (interpreter)": None,
    }
    out = {}
    for name, args in commands.items():
        times = []
        for _ in range(3):
            if args is None:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                times.append(time.perf_counter() - t0)
            else:
                times.append(run_cli(args, ws)[0])
        out[name] = min(times)
    return out


def demo_accuracy(ws: Path, precision: str, seed: int = 0) -> dict:
    """The demo digits (100 per class) fine-tuned with params.yaml's settings at 96 px, no flips, at ``precision``
    with ``seed`` (its own split, initialisation and shuffling): test accuracy and wall time."""
    from graft.demo import write_digits
    from graft.params import load_params, parse_params
    from graft.tasks.evaluate import evaluate
    from graft.tasks.finetune import finetune
    from graft.tasks.ingest import ingest

    if not (ws / "raw").is_dir():
        write_digits(ws / "raw", per_class=100)
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    run = ws / f"{precision}-seed{seed}"
    raw["seed"] = seed
    raw["data"].update(root=str(ws / "raw"), out_dir=str(ws / f"data-seed{seed}"))
    raw["featurize"].update(cache_dir=str(ws / "cache"), out=str(ws / f"data-seed{seed}/features.parquet"))
    raw["train"].update(mode="finetune", model_dir=str(run))
    raw["train"]["finetune"].update({"image_size": 96, "precision": precision})
    raw["train"]["finetune"]["augment"]["hflip"] = False  # digits are not mirror-symmetric
    raw["evaluate"].update(
        metrics_dir=str(run / "metrics"),
        plots_dir=str(run / "plots"),
        report=str(run / "report.md"),
    )
    params = parse_params(raw)
    ingest(params)
    t0 = time.perf_counter()
    summary = finetune(params)
    wall = time.perf_counter() - t0
    m = evaluate(params)["model"]
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "n": m["n"],
        "wall_s": wall,
        "epochs": summary["epochs"],
    }
