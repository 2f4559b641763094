"""Where one whole ``graft train`` fine-tune spends its time, phase by phase (the fixed costs that
``bench/train_speed.py``'s whole-run figures include).

    python bench/train_phases.py                          # 224 px, strategy full, params.yaml's epochs
    python bench/train_phases.py --strategy last_n --size 96

It writes the same 240 photo-like JPEGs as ``bench/train_speed.py`` (8 classes), ingests and featurizes them
in separate processes (``--no-table``: no featurize), then imports graft's fine-tune stage and runs it once in
this process with a timer around each phase: the imports, building the model, the LP-FT probe, the validation
passes, serialising the checkpoints, waiting for decoded batches, the calibration, the curves and the model
file. What is left of the fine-tune loop is the training steps themselves (with the EMA update and the
optimizer).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import speed_runs as ts  # bench/speed_runs.py: the images, workspaces and CLI runs of bench/train_speed.py

SPENT: collections.Counter[str] = collections.Counter()


def timed(owner: object, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``SPENT[label]``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def timed_training_batches(owner: object, name: str, label: str) -> None:
    """Like :func:`timed` for ``image_batches``: the time spent waiting for each augmented (training) batch."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        it = fn(*args, **kwargs)
        aug = kwargs.get("aug", args[4] if len(args) > 4 else None)
        if aug is None:  # no augmentation: a validation or probe pass, timed as such
            yield from it
            return
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                SPENT[label] += time.perf_counter() - t0
            yield item

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--strategy", default="full", help="finetune.strategy (last_n trains the top 2 groups)")
    ap.add_argument("--precision", default="auto", help="finetune.precision")
    ap.add_argument("--dir", help="keep the images and the workspace here (default: a temporary folder)")
    ap.add_argument("--no-table", action="store_true", help="no `graft featurize` first: the LP-FT probe computes")
    args = ap.parse_args(argv)
    epochs = ts.default_epochs()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.dir or tmp)
        data_root, ws = base / "images", base / "phases"
        if not data_root.is_dir():
            ts.write_images(data_root, 8, 30)
        ft = {"image_size": args.size, "epochs": epochs, "patience": 100, "precision": args.precision}
        ft.update({"strategy": args.strategy, "last_n": 2})
        fz = {"image_size": args.size}
        params_path = ts.workspace(ws, data_root, train={"mode": "finetune", "finetune": ft}, featurize=fz)
        ts.run_cli(["ingest", "--params", str(params_path)], ws)
        (ws / "data" / "features.parquet").unlink(missing_ok=True)
        if not args.no_table:  # as `dvc repro` orders the stages: the probe reads the feature table
            ts.run_cli(["featurize", "--params", str(params_path)], ws)

        t0 = time.perf_counter()
        import graft.frozen as frozen
        import graft.tasks.finetune as stage
        import graft.tune as tune
        from graft.params import load_params

        SPENT["imports (torch, scikit-learn, pandas, graft)"] = time.perf_counter() - t0
        timed(stage, "initial_model", "building the model (importing timm, weights)")
        timed(stage, "probe_start", "LP-FT probe (features + C by CV)")
        timed(frozen.ValActivations, "logits", "validation passes")
        timed(tune, "torch_bytes", "serialising checkpoints")
        timed_training_batches(tune, "image_batches", "waiting for decoded training batches")
        timed(stage, "_calibration", "calibration")
        timed(stage, "write_curves", "curves (CSV)")
        timed(stage, "save_model", "model file")
        timed(stage, "fit", "fine-tune loop (fit)")
        os.chdir(ws)
        t1 = time.perf_counter()
        summary = stage.finetune(load_params(params_path), resume=False)
        total = SPENT["imports (torch, scikit-learn, pandas, graft)"] + time.perf_counter() - t1
    loop = SPENT.pop("fine-tune loop (fit)")
    inside = ("validation passes", "serialising checkpoints", "waiting for decoded training batches")
    steps = loop - sum(SPENT[k] for k in inside)
    images = summary["train_images"] * summary["epochs"]
    print(
        f"{summary['train_images']} training images x {summary['epochs']} epochs at {args.size} px, "
        f"strategy {args.strategy}, precision {args.precision}, feature table {'no' if args.no_table else 'yes'}; "
        "one run, in-process (interpreter start not included)"
    )
    for label, seconds in SPENT.items():
        print(f"  {label:44s} {seconds:6.2f} s")
    print(f"  {'training steps (the rest of the loop)':44s} {steps:6.2f} s  ({images / steps:.1f} img/s)")
    print(f"  {'whole run':44s} {total:6.2f} s  ({images / total:.1f} img/s; {total - steps:.1f} s besides the steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
