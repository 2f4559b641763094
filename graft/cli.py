"""The ``graft`` command line. Stage commands call the same functions as the DVC stages and the flow.

Heavy imports (torch, prefect) happen inside the commands that need them, so ``graft predict``
loads only onnxruntime, Pillow and NumPy.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import graft
from graft import GraftError
from graft.console import missing_hint, prediction_lines, stage_line

STAGES = ("ingest", "featurize", "train", "evaluate", "export")  # graft.stages.STAGES, without importing it
STAGE_HELP = {
    "ingest": "decode, hash and split every image under data.root; quarantine the bad ones",
    "featurize": "cache the frozen backbone's features of every image not cached yet",
    "train": "train the model train.mode names (auto: try the candidates, keep the best on held-out data)",
    "evaluate": "test-split metrics of the model beside a raw-pixel baseline; the report",
    "export": "export the model as one ONNX graph checked against torch (and an int8 copy)",
}


def quiet_prefect() -> None:
    """No telemetry from graft's temporary Prefect servers, and no telemetry notice (Prefect 3 reads both at
    import: ``PREFECT_SERVER_ANALYTICS_ENABLED`` for the server, ``DO_NOT_TRACK`` for the client). An
    explicit setting in the environment wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


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
    """The model and baseline rows of ``metrics.json`` as a fixed-width table, then the verdict."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(missing_hint(path, "evaluate"))
    m = json.loads(path.read_text())
    details = path.with_name("evaluation.json")  # names and sentences live beside the headline figures
    d = json.loads(details.read_text()) if details.is_file() else m
    size = d.get("baseline_size", "?")
    model = m.get("model", m)  # the headline keeps the model's figures at the top level
    rows = [(d.get("model_name", "model"), model), (f"baseline: raw pixels {size}px + logreg", m["baseline"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  accuracy  macro_f1  bal_acc     ece     n"]
    lines += [
        f"{name:<{width}}  {r['accuracy']:>8.4f}  {r['macro_f1']:>8.4f}  {r['balanced_accuracy']:>7.4f}  "
        f"{r['ece']:>6.4f}  {r['n']:>4}"
        for name, r in rows
    ]
    sentence = d.get("vs_baseline", {}).get("sentence")
    return "\n".join(lines + ([sentence] if sentence else []))


def _predict(args: argparse.Namespace) -> int:
    from graft.predict import OnnxClassifier, list_images, predict_files, write_predictions

    model = OnnxClassifier(args.model, threads=args.threads)
    paths = list_images(args.target)
    if not paths:
        raise GraftError(f"no image files under {args.target}: nothing to predict")
    records = list(predict_files(model, paths, args.batch_size, args.top_k))
    k = min(args.top_k, len(model.classes))
    if args.out:
        write_predictions(records, args.out, k, sort=False)
    if args.print or not args.out:
        for line in prediction_lines(records, k):
            print(line)
    bad = sum(r["error"] is not None for r in records)
    where = f", written to {args.out}" if args.out else ""
    print(f"{len(records) - bad} predicted, {bad} unreadable{where}", file=sys.stderr)
    return 1 if bad == len(records) else 0  # nothing could be predicted: fail, so scripts notice


def _predict_dask(args: argparse.Namespace) -> int:
    """``graft predict --dask``: one Prefect task per shard on a Dask cluster, one Parquet of predictions."""
    from graft.flows.scale import predict_dask
    from graft.params import DaskParams

    if not args.out:
        raise GraftError("--dask needs --out PREDICTIONS.parquet")
    dask = DaskParams(address=args.address, n_workers=args.workers, threads_per_worker=1)
    s = predict_dask(args.target, args.model, args.out, dask, args.shard_size, args.batch_size)
    print(json.dumps({"predict": s}) if args.json else stage_line("predict", s))
    return 1 if s.get("images") and not s.get("predicted") else 0


def _gate(args: argparse.Namespace) -> int:
    """CI's promotion gate (:func:`graft.baseline.gate_against`)."""
    from graft.baseline import gate_against

    return gate_against(args.against, args.path, args.params, args.allow_missing)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _threads(text: str) -> int:
    """argparse type: an integer >= 0 (0 = onnxruntime's default)."""
    return 0 if text.strip() == "0" else _positive(text)


def _predictions_file(text: str) -> str:
    """argparse type: a file name whose extension names a predictions format."""
    from graft.predict import output_format

    try:
        output_format(text)
    except GraftError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--out {text}: ")) from None
    return text


def _common(s: argparse.ArgumentParser, wait_help: str | None = None, json_help: str | None = None) -> None:
    s.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    if wait_help:
        s.add_argument("--wait", type=float, default=None, metavar="SECONDS", help=wait_help)
    if json_help:
        s.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graft",
        description="Transfer learning for image classification: ingest, cached backbone features, "
        "head or fine-tune, evaluation against a raw-pixel baseline, ONNX export.",
    )
    p.add_argument("--version", action="version", version=f"graft {graft.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wait_help = (
        "seconds to wait when another graft run holds this workspace's lock "
        "(default: $GRAFT_LOCK_WAIT, else 0 = refuse at once)"
    )
    json_help = "print the full summary as one JSON object instead of a short line"

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    for name in STAGES:
        s = add(name, f"run the {name} stage: {STAGE_HELP[name]}")
        _common(s, wait_help, json_help)
        if name == "train":
            g = s.add_mutually_exclusive_group()
            g.add_argument(
                "--resume",
                action="store_true",
                default=None,
                help="finetune: continue from the last checkpoint (default: resume when one matches)",
            )
            g.add_argument("--fresh", dest="resume", action="store_false", help="finetune: ignore any checkpoint")
    s = add("run", "run the whole pipeline (ingest to export) as one Prefect flow")
    _common(s, wait_help, "print the flow's summary as one JSON object at the end")
    s = add("demo-data", "write scikit-learn's handwritten digits as class folders (a demo data set)")
    s.add_argument("--out", default="data/raw", help="the folder to write into (default: data/raw)")
    s.add_argument("--per-class", type=_positive, default=None, help="keep only N images per class (default: all)")
    s = add("predict", "classify a file or folder with an exported ONNX model (onnxruntime only, no torch)")
    s.add_argument("target", help="an image file, or a folder searched recursively (hidden entries skipped)")
    s.add_argument("--model", default="models/model.onnx", help="the exported model (default: models/model.onnx)")
    s.add_argument(
        "--out",
        type=_predictions_file,
        help="write the predictions to this file, in the format its extension names: .csv, .parquet or .jsonl "
        "(then nothing is printed per file unless --print)",
    )
    s.add_argument("--print", action="store_true", help="with --out: print the rows on screen too")
    s.add_argument("--top-k", type=_positive, default=1, help="show the K most likely classes per image (default 1)")
    s.add_argument("--batch-size", type=_positive, default=32, help="images per onnxruntime call (default 32)")
    s.add_argument("--threads", type=_threads, default=0, help="onnxruntime threads (default 0: all cores)")
    # scale-out (flows/scale.py): shards over a Dask cluster through Prefect; imports prefect/dask, not torch
    s.add_argument("--dask", action="store_true", help="run over a Dask cluster: a LocalCluster, or --address")
    s.add_argument("--address", help="with --dask: the Dask scheduler, e.g. tcp://scheduler:8786")
    s.add_argument("--workers", type=_positive, default=2, help="with --dask and no --address: LocalCluster workers")
    s.add_argument("--shard-size", type=_positive, default=512, help="with --dask: images per Prefect task")
    s.add_argument("--json", action="store_true", help="with --dask: print the summary as one JSON object")
    s = add("retrain", "the retrain flow: train a challenger on the current data, promote it if it beats the champion")
    _common(s, wait_help, "print the decision as one JSON object at the end")
    s = add("gate", "exit 1 if the evaluation fails the retrain gate against a git revision's")
    _common(s)
    s.add_argument("--against", default="HEAD", help="git revision holding the baseline metrics (default HEAD)")
    s.add_argument(
        "--path",
        default="metrics/evaluation.json",
        help="the evaluation with per-class scores (default: metrics/evaluation.json)",
    )
    s.add_argument("--allow-missing", action="store_true", help="pass when --against has no metrics (a first run)")
    s = add("metrics", "print the model vs baseline table from metrics.json")
    s.add_argument("--path", default="metrics/metrics.json", help="the metrics file (default: metrics/metrics.json)")
    add("backbones", "list the registered backbones")
    return p


def _run(args: argparse.Namespace) -> int:
    """The command ``args`` names; its exit status."""
    if args.command in STAGES:
        from graft.lock import workspace_lock

        with workspace_lock(args.params, args.wait):  # overlapping runs would rewrite each other's outputs
            summary = _stage(args.command, args.params, getattr(args, "resume", None))
        print(json.dumps({args.command: summary}, default=str) if args.json else stage_line(args.command, summary))
    elif args.command in ("run", "retrain"):
        from graft.lock import workspace_lock
        from graft.startup import loading

        with workspace_lock(args.params, args.wait):  # taken before Prefect starts: a refusal is quick
            with loading():
                if args.command == "run":
                    from graft.flows.pipeline import pipeline as flow
                else:
                    from graft.flows.retrain import retrain as flow
                from graft.prefect_api import prefect_api

            with prefect_api():  # no PREFECT_API_URL: graft's temporary server, which dies with this process
                summary = flow(args.params)
        if args.json:
            print(json.dumps(summary, default=str))
        return 1 if summary.get("decision") == "rejected" else 0
    elif args.command == "gate":
        return _gate(args)
    elif args.command == "demo-data":
        from graft.demo import write_digits

        counts = write_digits(args.out, args.per_class)
        print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out}")
    elif args.command == "predict":
        return _predict_dask(args) if args.dask else _predict(args)
    elif args.command == "metrics":
        print(metrics_table(args.path))
    elif args.command == "backbones":
        from graft.registry import REGISTRY  # configs only: no torch

        print("\n".join([*REGISTRY, "timm:<any timm model name>"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_prefect()
    try:
        return _run(args)
    except GraftError as exc:
        print(f"graft: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # graft.atomic maps a full disk during a write; this catches it anywhere else (mkdir, temp file).
        where = f" ({exc.filename})" if exc.filename else ""
        # pyarrow raises FileNotFoundError(path) with the path as its only argument
        missing = exc.filename or (str(exc) if len(exc.args) == 1 else None)
        if isinstance(exc, FileNotFoundError) and missing:
            print(f"graft: error: {missing_hint(missing)}", file=sys.stderr)
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
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


def entry() -> NoReturn:
    """The ``graft`` command (console script and ``python -m graft.cli``): :func:`main` in a process that ends
    with it, so the modules it loads and the interpreter's exit skip the garbage collector's scans
    (:mod:`graft.startup`)."""
    from graft.startup import exit_process, one_command

    one_command()
    exit_process(main())


if __name__ == "__main__":
    entry()
