"""Training and start-up speed on CPU, in one run: graft's fine-tune against a plain loop, bf16 against fp32,
``last_n`` against ``full``, int8 against fp32 featurize, and how fast the light commands start.

    python bench/train_speed.py             # everything (~15-19 min on 2 cores)
    python bench/train_speed.py --quick     # fewer images and epochs, no demo accuracy runs: a smoke test
    python bench/train_speed.py --pairs 5   # only the 224 px target: 5 bracketed (plain loop, graft) pairs
    python bench/train_speed.py --pairs 3 --per-class 100   # the same on 800 images: the fixed costs amortised

Rows (all measured in one run, so the ratios share the machine's state; graft commands and step-anatomy rows
each in a fresh process):
  plain loop     EfficientNet-Lite0 (timm, the same body graft builds) + a linear layer, NCHW fp32, AdamW,
                 batch 32, on tensors already in memory (no decoding, no validation): the usual hand-written
                 loop's training step. Its img/s is the reference the targets divide by. At 224 px the loop
                 runs before each graft run in the best precision and after it (plain, graft, plain, graft, ...,
                 three graft runs: "bracketed pairs"); each graft run is divided by the faster plain loop beside
                 it, and the 224 px target is judged on the median of those ratios, since the plain loop alone
                 moves by a quarter within a run on these machines (glibc maps and faults its activations in
                 afresh each step). The table shows the first pair.
  graft train    whole ``graft train`` processes (``train.mode: finetune``, ``strategy: full``, params.yaml's
                 epochs) on photo-like JPEGs at 224 px and at the demo's 96 px: start-up, the LP-FT probe,
                 decoding and augmentation, every validation pass and the checkpoints are all inside the wall time;
                 img/s = training images x epochs / wall seconds. fp32 and bf16 (``finetune.precision``; bf16 only
                 on a CPU with native bf16, as for every bf16 row below). Each runs after ``graft featurize`` at
                 its size, as ``dvc repro`` orders the stages, so the probe reads its features from the feature
                 table; one more 224 px run in the best precision without the table computes them.
  step anatomy   one training step at 224 px: every layer trains (graft's step: bf16 where native with the
                 depthwise convolutions that are slow in bf16 in fp32 and activations out of place, frozen
                 BatchNorm folded into the convolutions with the activations after it computed by them, and freed
                 memory kept for reuse; also with glibc's malloc defaults, without the fold, with the fold but the
                 activations on their own, all fp32, every depthwise layer fp32, in-place activations, and every
                 depthwise layer bf16, and AdamW not fused),
                 ``last_n: 2`` by ``requires_grad`` alone (autograd then records nothing below the first trainable
                 block), and the same with the frozen prefix run under ``torch.no_grad`` explicitly: what the
                 explicit step adds.
  last_n         whole ``graft train`` with ``strategy: last_n, last_n: 2`` against ``full`` (same precision).
  featurize      ``graft featurize`` on a fresh cache, fp32 against ``precision: int8`` (onnxruntime), img/s of
                 the computed part; the int8 graph's one-off export + calibration + quantization beside it.
  start-up       wall seconds of ``graft --help``, ``graft backbones``, ``graft metrics`` and a fully cached
                 ``graft featurize`` as fresh processes (best of 3).
  demo accuracy  the demo digits (100 per class) fine-tuned with params.yaml's settings at 96 px without
                 flips, fp32 and bf16, for each of --demo-seeds (each its own split): final test accuracy side by
                 side, and the mean (skipped by --quick).

The rows are measured by bench/speed_runs.py (whole graft processes) and bench/speed_steps.py (the plain loop and
the step anatomy); bench/speed_report.py prints the tables and judges the targets.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from speed_report import TARGETS, pair_ratio, pairs_line, report
from speed_runs import default_epochs, demo_accuracy, featurize_speed, graft_train, startup, write_images
from speed_steps import plain_loop, step_anatomy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and epochs, no demo accuracy runs")
    ap.add_argument("--dir", help="keep the images and workspaces here (default: a temporary folder)")
    ap.add_argument("--demo-seeds", default="0,1,2", help="seeds of the fp32/bf16 demo accuracy runs (comma list)")
    ap.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="only the 224 px target: the plain loop, then N times (graft full in the best precision, the plain "
        "loop); each graft run against the faster plain loop beside it, and the median",
    )
    ap.add_argument(
        "--per-class",
        type=int,
        default=30,
        help="--pairs: images per class (8 classes; default 30, the full run's set). A run's start-up, model build "
        "and probe cost the same at any size, so larger sets move the whole-run ratio towards the step's",
    )
    args = ap.parse_args(argv)
    if args.pairs:
        return ratio_pairs(args.pairs, args.dir, args.per_class)
    import torch

    per_class, epochs, steps, n_pairs = (12, 1, 3, 1) if args.quick else (30, default_epochs(), 6, 3)
    best = best_precision()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.dir or tmp)
        data_root = base / "images"
        if not data_root.is_dir():
            write_images(data_root, 8, per_class)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, native CPU bf16: {best == 'bf16'}; "
            f"{8 * per_class} photo-like JPEGs 320x256 in 8 classes; graft runs {epochs} epochs",
            flush=True,
        )
        res: dict = {"plain": {}, "graft": {}, "anatomy": {}, "featurize": {}, "startup": {}, "demo": {}}
        # bf16 rows only where the CPU has bf16 (graft's `precision: auto` trains in fp32 elsewhere: emulated bf16
        # is slower than fp32, and a whole run of it would take most of this benchmark's time)
        res["precisions"] = precisions = ("fp32", "bf16") if best == "bf16" else ("fp32",)
        for size in (224, 96):
            res["plain"][size] = plain_loop(size, steps)
            print(f"  plain loop {size}px: {res['plain'][size]:.1f} img/s", flush=True)
            for precision in precisions if size == 96 else [q for q in precisions if q != best]:
                r = graft_train(base / f"ft{size}", data_root, size, epochs, precision, {"strategy": "full"})
                res["graft"][(size, precision, "full")] = r
                print(f"  graft train {size}px {precision} full: {r['img_per_s']:.1f} img/s", flush=True)
            if size == 224:  # the best precision in bracketed pairs; the table's plain loop: the first pair's faster
                pairs = bracketed_pairs(n_pairs, base / "ft224", data_root, epochs, res["plain"][size], steps, best)
                res["pairs"], res["graft"][(size, best, "full")] = pairs, pairs[0][1]
                res["plain"][size] = max(pairs[0][0], pairs[0][2])
        for precision in precisions:
            r = graft_train(base / "ft224", data_root, 224, epochs, precision, {"strategy": "last_n", "last_n": 2})
            res["graft"][(224, precision, "last_n 2")] = r
            print(f"  graft train 224px {precision} last_n 2: {r['img_per_s']:.1f} img/s", flush=True)
        r = graft_train(base / "ft224-cold", data_root, 224, epochs, best, {"strategy": "full"}, table=False)
        res["graft"][(224, best, "full, no table")] = r
        print(f"  graft train 224px {best} full, no feature table: {r['img_per_s']:.1f} img/s", flush=True)
        res["anatomy"] = step_anatomy(224, steps, bf16=best == "bf16")
        for precision in ("fp32", "int8"):
            res["featurize"][precision] = featurize_speed(base / f"feat-{precision}", data_root, precision)
            print(f"  featurize {precision}: {res['featurize'][precision]['img_per_s']} img/s", flush=True)
        res["startup"] = startup(base / "feat-fp32")
        if not args.quick:
            for seed in [int(x) for x in args.demo_seeds.split(",") if x.strip()]:
                for precision in precisions:
                    res["demo"][(seed, precision)] = demo_accuracy(base / "demo", precision, seed)
                    print(f"  demo seed {seed} {precision}: {res['demo'][(seed, precision)]}", flush=True)
    print(report(res))
    return 0


def best_precision() -> str:
    """bf16 where the CPU runs it natively, else fp32 (emulated bf16 is slower than fp32)."""
    from graft.precision import cpu_bf16_native

    return "bf16" if cpu_bf16_native() else "fp32"


def bracketed_pairs(
    n: int, ws: Path, data_root: Path, epochs: int, plain_before: float, steps: int = 6, precision: str = "bf16"
) -> list[tuple[float, dict, float]]:
    """``n`` whole ``graft train`` runs (224 px, full, ``precision``), each followed by the plain loop, so every
    graft run has a plain loop on either side (the first one's left side: ``plain_before``, measured by the caller).

    Returns (plain loop before, graft's run, plain loop after) per run; :func:`pair_ratio` divides by the faster
    of the two, the conservative reference on a machine whose speed drifts."""
    out, left = [], plain_before
    for i in range(n):
        r = graft_train(ws, data_root, 224, epochs, precision, {"strategy": "full"})
        right = plain_loop(224, steps)
        out.append((left, r, right))
        print(
            f"pair {i + 1}: plain loop {left:.1f} | graft full {precision} {r['img_per_s']:.1f} img/s "
            f"({r['wall_s']:.1f} s) | plain loop {right:.1f}: {pair_ratio(out[-1]):.2f}x",
            flush=True,
        )
        left = right
    return out


def ratio_pairs(n: int, keep: str | None, per_class: int = 30) -> int:
    """The 224 px target on a noisy machine: the plain loop, then ``n`` times (a whole graft train, full, in the
    best precision; the plain loop) on ``8 x per_class`` images; each graft run against the faster plain loop
    beside it, and the median of those ratios."""
    epochs = default_epochs()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(keep or tmp)
        suffix = "" if per_class == 30 else f"-{per_class}"  # the full run's folders hold 30 a class
        data_root = base / f"images{suffix}"
        if not data_root.is_dir():
            write_images(data_root, 8, per_class)
        print(f"{8 * per_class} photo-like JPEGs 320x256 in 8 classes; graft runs {epochs} epochs", flush=True)
        pairs = bracketed_pairs(
            n, base / f"ft224{suffix}", data_root, epochs, plain_loop(224, 6), precision=best_precision()
        )
    line, ok = pairs_line(pairs)
    print(f"{line}: target {TARGETS['vs_plain_224']}x: {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
