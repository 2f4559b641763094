"""The ``graft`` command line. Stage commands call the same functions as the DVC stages and the flow.

Heavy imports (torch, prefect) happen inside the commands that need them, so ``graft predict``
loads only onnxruntime, Pillow and NumPy.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from graft import GraftError

STAGES = ("ingest", "featurize", "train", "evaluate", "export")  # graft.stages.STAGES, without importing it


def _stage(name: str, params_path: str, resume: bool | None = None) -> dict:
    from graft.params import load_params
    from graft.stages import run_stage

    params = load_params(params_path)
    if resume is None:
        return run_stage(name, params)
    if params.train.mode != "finetune":
        raise GraftError(f"--resume/--fresh apply to fine-tuning; train.mode is {params.train.mode}")
    return run_stage(name, params, resume=resume)


def metrics_table(path: str | Path = "metrics/metrics.json") -> str:
    """The model and baseline rows of metrics.json as a fixed-width table."""
    m = json.loads(Path(path).read_text())
    rows = [(m["model_name"], m["model"]), (f"baseline: raw pixels {m['baseline_size']}px + logreg", m["baseline"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  accuracy  macro_f1  bal_acc     ece     n"]
    lines += [
        f"{name:<{width}}  {r['accuracy']:>8.4f}  {r['macro_f1']:>8.4f}  {r['balanced_accuracy']:>7.4f}  "
        f"{r['ece']:>6.4f}  {r['n']:>4}"
        for name, r in rows
    ]
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> None:
    import csv

    from graft.predict import OnnxClassifier, list_images, predict_files

    model = OnnxClassifier(args.model, threads=args.threads)
    paths = list_images(args.target)
    if not paths:
        raise GraftError(f"no image files under {args.target}")
    records = list(predict_files(model, paths, args.batch_size, args.top_k))
    if args.out:
        import io

        from graft.atomic import write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["path", "label", "probability", "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        write_text(args.out, buf.getvalue())
    for r in records:
        shown = f"{r['label']}\t{r['probability']:.4f}" if r["error"] is None else f"ERROR\t{r['error']}"
        print(f"{r['path']}\t{shown}")
    bad = sum(r["error"] is not None for r in records)
    print(f"{len(records) - bad} predicted, {bad} unreadable", file=sys.stderr)


def _predict_dask(args: argparse.Namespace) -> None:
    """``graft predict --dask``: one Prefect task per shard on a Dask cluster, one Parquet of predictions."""
    from graft.flows.scale import predict_dask
    from graft.params import DaskParams

    if not args.out:
        raise GraftError("--dask needs --out PREDICTIONS.parquet")
    if args.workers < 1 or args.shard_size < 1:
        raise GraftError("--workers and --shard-size must be at least 1")
    dask = DaskParams(address=args.address, n_workers=args.workers, threads_per_worker=1)
    print(
        json.dumps({"predict": predict_dask(args.target, args.model, args.out, dask, args.shard_size, args.batch_size)})
    )


def _gate(args: argparse.Namespace) -> int:
    """CI's promotion gate: the workspace's test metrics against those committed at ``--against``.

    Fails closed: a revision or file that cannot be found is an error unless ``--allow-missing``.
    """
    from graft.baseline import Missing, check_revision, committed_text, model_metrics
    from graft.params import load_params
    from graft.tasks.retrain import gate

    check_revision(args.against)  # before any git call
    if not Path(args.path).is_file():
        raise GraftError(f"{args.path} not found: run `graft evaluate` (or `dvc repro`) first")
    current = model_metrics(Path(args.path).read_text(encoding="utf-8"), args.path)
    try:
        commit, text = committed_text(args.against, args.path)
    except Missing as why:
        if not args.allow_missing:
            raise GraftError(
                f"no baseline {args.path} at {args.against} ({why}): fix --against, or pass --allow-missing "
                "to let a first run pass"
            ) from None
        print(f"gate: PASS: no baseline {args.path} at {args.against} ({why}), allowed by --allow-missing")
        return 0
    baseline = model_metrics(text, f"{args.path} at {args.against} ({commit[:12]})")
    ok, reason = gate(current, baseline, load_params(args.params).retrain)
    print(f"gate: {'PASS' if ok else 'FAIL'}: {reason}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Transfer learning for image classification.")
    sub = p.add_subparsers(dest="command", required=True)
    wait_help = (
        "seconds to wait when another graft run holds this workspace's lock "
        "(default: $GRAFT_LOCK_WAIT, else 0 = refuse at once)"
    )
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage")
        s.add_argument("--params", default="params.yaml")
        s.add_argument("--wait", type=float, default=None, metavar="SECONDS", help=wait_help)
        if name == "train":
            g = s.add_mutually_exclusive_group()
            g.add_argument(
                "--resume",
                action="store_true",
                default=None,
                help="finetune: continue from the last checkpoint (default: resume when one matches)",
            )
            g.add_argument("--fresh", dest="resume", action="store_false", help="finetune: ignore any checkpoint")
    s = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS", help=wait_help)
    s = sub.add_parser("demo-data", help="write scikit-learn's handwritten digits as class folders")
    s.add_argument("--out", default="data/raw")
    s.add_argument("--per-class", type=int, default=None, help="keep only N images per class")
    s = sub.add_parser("predict", help="classify a file or folder with an exported ONNX model (onnxruntime only)")
    s.add_argument("target")
    s.add_argument("--model", default="models/model.onnx")
    s.add_argument("--out", help="also write the predictions as CSV")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--top-k", type=int, default=1)
    s.add_argument("--threads", type=int, default=0)
    # scale-out (flows/scale.py): shards over a Dask cluster through Prefect; imports prefect/dask, not torch
    s.add_argument("--dask", action="store_true", help="run over a Dask cluster: a LocalCluster, or --address")
    s.add_argument("--address", help="with --dask: the Dask scheduler, e.g. tcp://scheduler:8786")
    s.add_argument("--workers", type=int, default=2, help="with --dask and no --address: LocalCluster workers")
    s.add_argument("--shard-size", type=int, default=512, help="with --dask: images per Prefect task")
    s = sub.add_parser("retrain", help="the retrain flow: challenger vs champion on the current data")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS", help=wait_help)
    s = sub.add_parser("gate", help="exit 1 if metrics.json fails the retrain gate against a git revision's")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--against", default="HEAD", help="git revision holding the baseline metrics (default HEAD)")
    s.add_argument("--path", default="metrics/metrics.json")
    s.add_argument("--allow-missing", action="store_true", help="pass when --against has no metrics (a first run)")
    s = sub.add_parser("metrics", help="print the model vs baseline table from metrics.json")
    s.add_argument("--path", default="metrics/metrics.json")
    sub.add_parser("backbones", help="list the registered backbones")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in STAGES:
            from graft.lock import workspace_lock

            with workspace_lock(args.params, args.wait):  # overlapping runs would rewrite each other's outputs
                summary = _stage(args.command, args.params, getattr(args, "resume", None))
            print(json.dumps({args.command: summary}, default=str))
        elif args.command == "run":
            from graft.lock import workspace_lock

            with workspace_lock(args.params, args.wait):  # taken before Prefect starts: a refusal is quick
                from graft.flows.pipeline import pipeline
                from graft.prefect_api import prefect_api

                with prefect_api():  # no PREFECT_API_URL: graft's temporary server, which dies with this process
                    pipeline(args.params)
        elif args.command == "retrain":
            from graft.lock import workspace_lock

            with workspace_lock(args.params, args.wait):
                from graft.flows.retrain import retrain
                from graft.prefect_api import prefect_api

                with prefect_api():
                    decision = retrain(args.params)["decision"]
            return 1 if decision == "rejected" else 0
        elif args.command == "gate":
            return _gate(args)
        elif args.command == "demo-data":
            from graft.demo import write_digits

            counts = write_digits(args.out, args.per_class)
            print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out}")
        elif args.command == "predict":
            _predict_dask(args) if args.dask else _predict(args)
        elif args.command == "metrics":
            print(metrics_table(args.path))
        elif args.command == "backbones":
            from graft.backbones import REGISTRY

            print("\n".join([*REGISTRY, "timm:<any timm model name>"]))
    except GraftError as exc:
        print(f"graft: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # graft.atomic maps a full disk during a write; this catches it anywhere else (mkdir, temp file).
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"graft: error: disk full{where}: free space and rerun; finished outputs are intact", file=sys.stderr)
        else:
            print(
                f"graft: error: I/O error{where}: {exc.strerror or exc}; rerun when the storage is back",
                file=sys.stderr,
            )
        return 2
    except KeyboardInterrupt:
        print("graft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
