"""Benchmark `graft predict` with the fp32 and int8 exports of the demo model, in one run.

    .venv/bin/python bench/predict.py            # full digits demo + 1 000 photos (~3-5 min on 2 cores)
    .venv/bin/python bench/predict.py --quick    # 30 digits per class + 64 photos: a smoke test
    .venv/bin/python bench/predict.py --dir /data/bp

Trains the demo (scikit-learn's digits -> Lite0 features -> logistic head), exports it with
``export.quantize: int8`` and prints what the export stage recorded (test accuracy, batch-1 and
batch-32 latency of both models), then ``graft predict`` throughput over a folder of photo-like
JPEGs for each model: in process (decode + forward), forward only, and as the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from photos import make_bases, write_photos  # bench/photos.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the graft imports below (inside functions) use this checkout's code

TARGETS = {"speedup_batch_32": 1.5, "max_accuracy_drop": 0.01}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="folder for the demo workspace and photos (default: a temporary folder, removed)")
    p.add_argument("--count", type=int, default=1000, help="photos to predict")
    p.add_argument("--per-class", type=int, default=None, help="digits per class in the demo (default: all 1 797)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for predict (0 = its default)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.per_class = 64, 30
    return args


def demo_params(ws: Path):
    from graft.params import parse_params

    return parse_params(
        {
            "data": {"root": str(ws / "raw"), "out_dir": str(ws / "data")},
            "featurize": {"cache_dir": str(ws / "cache"), "out": str(ws / "data/features.parquet")},
            "train": {"model_dir": str(ws / "models")},
            "evaluate": {
                "metrics_dir": str(ws / "metrics"),
                "plots_dir": str(ws / "plots"),
                "report": str(ws / "reports/report.md"),
            },
            "export": {"out": str(ws / "models/model.onnx"), "quantize": "int8"},
        }
    )


def build_demo(ws: Path, per_class: int | None) -> tuple[dict, float]:
    """Run the demo pipeline up to export; return export.json and the export stage's seconds."""
    from graft.demo import write_digits
    from graft.tasks.export import export
    from graft.tasks.featurize import featurize
    from graft.tasks.ingest import ingest
    from graft.tasks.train_head import train

    params = demo_params(ws)
    if not (ws / "raw").exists():
        write_digits(ws / "raw", per_class)
    ingest(params)
    featurize(params)
    train(params)
    t0 = time.perf_counter()
    export(params)
    return json.loads((ws / "metrics" / "export.json").read_text()), time.perf_counter() - t0


def predict_rate(model_path: Path, paths: list[Path], batch_size: int, threads: int) -> tuple[float, int]:
    """img/s of graft.predict.predict_files over ``paths`` (decode + forward), and the files predicted."""
    from graft.predict import OnnxClassifier, predict_files

    clf = OnnxClassifier(model_path, threads=threads)
    t0 = time.perf_counter()
    records = list(predict_files(clf, paths, batch_size))
    return len(records) / (time.perf_counter() - t0), sum(r["error"] is None for r in records)


def forward_rate(model_path: Path, batch: np.ndarray, threads: int, runs: int = 5) -> float:
    """img/s of the model alone at this batch (best of ``runs``, after a warm-up)."""
    from graft.predict import OnnxClassifier

    clf = OnnxClassifier(model_path, threads=threads)
    clf.predict_arrays(batch)
    best = min(_time(lambda: clf.predict_arrays(batch)) for _ in range(runs))
    return len(batch) / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cli_seconds(folder: Path, model: Path, out: Path) -> float:
    """Wall time of `graft predict FOLDER --model MODEL --out CSV` in a fresh interpreter."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "graft.cli", "predict", str(folder), "--model", str(model), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode:
        raise SystemExit(f"graft predict failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def run(args: argparse.Namespace, base: Path) -> None:
    from graft.images import load_batch
    from graft.predict import OnnxClassifier, list_images

    ws = base / "demo"
    report, t_export = build_demo(ws, args.per_class)
    f, q = report["fp32"], report["int8"]
    print(
        f"demo: {f['test_images']} test digits; export stage {t_export:.1f} s (incl. int8 calibration and measurements)"
    )
    print(f"{'':6}{'test acc':>10}{'batch-1 ms':>12}{'batch-32 ms':>13}{'MB':>7}")
    for name, m in (("fp32", f), ("int8", q)):
        print(
            f"{name:6}{m['test_accuracy']:>10.4f}{m['latency_ms']['batch_1']:>12.2f}{m['latency_ms']['batch_32']:>13.1f}"
            f"{m['bytes'] / 2**20:>7.1f}"
        )
    print(
        f"int8 speedup: batch 32 {report['int8_speedup_batch_32']}x, batch 1 {report['int8_speedup_batch_1']}x; "
        f"accuracy drop {report['int8_accuracy_drop'] * 100:.2f} points; "
        f"argmax agreement {q['argmax_agreement_with_fp32']:.3f}"
    )

    photos = base / "photos"
    write_photos(photos, 0, args.count, make_bases(min(args.count, 100), 0.0), 0.0)
    paths = list_images(photos)
    models = {"fp32": ws / "models/model.onnx", "int8": ws / "models/model.int8.onnx"}
    batch = load_batch(paths[: args.batch_size], OnnxClassifier(models["fp32"]).preprocess)
    rates = {}
    print(
        f"\ngraft predict over {len(paths)} 500x375 JPEGs (batch {args.batch_size}; load avg {os.getloadavg()[0]:.2f}):"
    )
    for name, path in models.items():
        rate, ok = predict_rate(path, paths, args.batch_size, args.threads)
        fwd = forward_rate(path, batch, args.threads)
        cli = cli_seconds(photos, path, base / f"pred-{name}.csv")
        rates[name] = (rate, fwd)
        print(
            f"  {name}: {rate:7.1f} img/s decode + forward ({ok} predicted); forward only {fwd:7.1f} img/s; "
            f"CLI {cli:.1f} s ({len(paths) / cli:.1f} img/s incl. start-up)"
        )
    print(
        f"  int8 / fp32: predict {rates['int8'][0] / rates['fp32'][0]:.2f}x, "
        f"forward {rates['int8'][1] / rates['fp32'][1]:.2f}x"
    )

    speed, drop = report["int8_speedup_batch_32"], report["int8_accuracy_drop"]
    print("\ntargets (from this run's export.json):")
    print(
        f"  {'MET ' if speed >= TARGETS['speedup_batch_32'] else 'MISS'} "
        f"int8 >= {TARGETS['speedup_batch_32']}x fp32 at batch 32: {speed}x"
    )
    print(
        f"  {'MET ' if drop <= TARGETS['max_accuracy_drop'] else 'MISS'} accuracy loss <= 1 point on the demo: "
        f"{drop * 100:.2f} points ({f['test_images']} test images)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="graft-bench-predict-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        run(args, base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
