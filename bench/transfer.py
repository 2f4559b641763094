"""Transfer benchmark: raw pixels, a scikit-learn probe and graft's modes, scored on held-out real images.

    python bench/transfer.py                                    # all sets, all rows (fine-tune rows take minutes)
    python bench/transfer.py --sets digits,icons --modes pixels,probe,head
    python bench/transfer.py --budget-minutes 30 --out cache/bench

Builds the sets with bench/datasets.py (see its docstring for the apt-get line). Per set, each row
learns from ``pool/`` only and is scored once on ``heldout/``:
  pixels    16x16 grey pixels, StandardScaler + LogisticRegression, C by 5-fold CV on the pool
  probe     the same scikit-learn probe on EfficientNet-Lite0 features from graft's own backbone
  probe_trainval
            that probe fit on graft's own train+val images only (the split ``graft ingest`` makes of the pool):
            the images the default ``auto`` (``refit: trainval``) learns from, so the like-for-like reference
  probe_int8
            that probe on the features of graft's int8 backbone (see ``head_int8`` below)
  head, finetune, auto, head_int8
            graft's CLI stages (ingest, featurize, train, evaluate, export) in a fresh project per row
            (``<out>/<set>/runs/<mode>``, its own feature cache, so wall times are comparable), then
            ``graft predict`` on the held-out folder: the score reads only models/model.onnx.
``auto_all`` is auto with ``train.refit: all``: after the test metrics, the exported model is refit on every pool
image, as the scikit-learn rows are (the default ``trainval`` never trains on graft's own test split, 15 %).
``head_int8`` is graft's head on features from the int8-quantized backbone (``featurize.precision: int8``);
``probe_int8`` is the probe row on that backbone's features (graft's own int8 engine, calibrated on pool images as
``graft featurize`` calibrates on its own): a convex, deterministic fit, so its difference to ``probe`` is what
the int8 features change, without the head's training noise.
A mode that params validation rejects (``auto`` until it lands) is reported as n/a. Prints one table
per set and the targets; writes every row to ``<out>/transfer.json`` (merged by set).

The rows are run by bench/transfer_rows.py, the features and scores come from bench/transfer_scores.py and the
target lines from bench/transfer_checks.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transfer_checks import targets
from transfer_rows import graft_row, run_cmd, sklearn_row
from transfer_scores import PIXELS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft import GraftError  # noqa: E402 - after sys.path points at this checkout
from graft.atomic import write_json  # noqa: E402


def _bench_datasets():
    """bench/datasets.py, loaded by path: a plain ``import datasets`` could pick up Hugging Face's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("graft_bench_datasets", REPO / "bench" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DATASETS = _bench_datasets()
BUILDERS, build_set, check_sources = _DATASETS.BUILDERS, _DATASETS.build_set, _DATASETS.check_sources

ROWS = ("pixels", "probe", "probe_trainval", "probe_int8", "head", "head_int8", "finetune", "auto", "auto_all")


NAMES = {
    "pixels": f"raw pixels {PIXELS}x{PIXELS} + LR",
    "probe": "sklearn probe on Lite0",
    "probe_trainval": "  same, graft's trainval",
    "probe_int8": "  same, int8 features",
    "head": "graft head",
    "head_int8": "graft head, int8 feats",
    "finetune": "graft finetune",
    "auto": "graft auto",
    "auto_all": "graft auto, refit all",
}


def format_table(name: str, result: dict) -> str:
    """One set's rows: accuracy and macro-F1 with 95% intervals, wall seconds, a note; then the targets."""
    lines = [
        f"== {name}: pool {result['pool']} images, heldout {result['heldout']} images, {result['classes']} classes",
        f"{'row':<24} {'accuracy [95% CI]':<23} {'macro-F1 [95% CI]':<23} {'wall s':>7}  note",
    ]
    for key, r in result["rows"].items():
        if "accuracy" not in r:
            lines.append(f"{NAMES[key]:<24} {r['status']}")
            continue
        acc = f"{r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]"
        f1 = f"{r['macro_f1']:.3f} [{r['macro_f1_ci'][0]:.3f}, {r['macro_f1_ci'][1]:.3f}]"
        note = (f"[earlier run {r['time']}] " if r.get("earlier") else "") + r.get("note", "")
        lines.append(f"{NAMES[key]:<24} {acc:<23} {f1:<23} {r['wall_s']:>7.1f}  {note}")
    auto = result["rows"].get("auto", {})
    lines.append(f"auto wall time: {auto['wall_s']:.1f} s" if "wall_s" in auto else "auto wall time: n/a")
    lines += [f"target ({result['target_metric']}) {k}: {v}" for k, v in result["targets"].items()]
    trust = [(k, r) for k, r in result["rows"].items() if r.get("calibration")]
    if trust:
        lines.append("graft's test split: temperature, ECE and NLL before -> after; unknown (LOCO AUROC, photos)")
        for key, r in trust:
            c, u = r["calibration"], r.get("unknown", {})
            cal = (
                f"T={c.get('temperature', 1.0):.2f} ECE {c.get('ece_before', float('nan')):.3f}->"
                f"{c.get('ece_after', float('nan')):.3f} NLL {c.get('nll_before', float('nan')):.3f}->"
                f"{c.get('nll_after', float('nan')):.3f}"
            )
            unk = " ".join(f"{k.removeprefix('auroc_')} {v:.3f}" for k, v in u.items() if k.startswith("auroc_"))
            rej = f"rejected at threshold {u['rejected_at_threshold']:.2f}" if "rejected_at_threshold" in u else ""
            pho = f"photos rejected {u['photos_rejected']:.2f}" if "photos_rejected" in u else ""
            by = [(k.removeprefix("photos_rejected_"), v) for k, v in u.items() if k.startswith("photos_rejected_")]
            pho += f" ({', '.join(f'{k} {v:.2f}' for k, v in by)} at test-split thresholds)" if by else ""
            lines.append(f"  {NAMES[key]:<22} {cal}; AUROC {unk or 'n/a'}; {rej} {pho}".rstrip())
    board = result["rows"].get("auto", {}).get("leaderboard")
    if board:
        lines.append(
            "auto leaderboard (val score +- se): "
            + "; ".join(
                f"{b['candidate']}{'*' if str(b.get('chosen')).lower() == 'true' else ''} "
                + (f"{float(b['score']):.3f}+-{float(b['se'] or 0):.3f}" if b.get("score") else (b.get("note") or "-"))
                for b in board
            )
        )
    return "\n".join(lines)


def run_set(
    name: str,
    out: Path,
    modes: list[str],
    seed: int,
    deadline: float | None,
    metric: str,
    earlier: dict | None = None,
    auto_budget: float | None = None,
) -> dict:
    """Build the set, run the rows in ``modes`` (``auto_budget``: the auto rows' ``train.budget_minutes``); rows
    of an earlier run of the same set build are kept."""
    record = build_set(name, out, seed)
    set_dir = out / name
    stamp = {
        "commit": run_cmd(["git", "describe", "--always", "--dirty"], REPO, 30).stdout.strip(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: dict[str, dict] = {}
    if earlier and earlier.get("spec") == record["spec"]:
        rows = {k: {**r, "earlier": True} for k, r in earlier["rows"].items() if k not in modes}
    for mode in modes:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            rows[mode] = {"status": "skipped: over the time budget"}
        elif mode in ("pixels", "probe", "probe_trainval", "probe_int8"):
            rows[mode] = sklearn_row(mode, set_dir, seed)
        else:
            rows[mode] = graft_row(mode, set_dir, seed, left, auto_budget)
        rows[mode].update(stamp)
        print(f"  {name}/{mode}: {rows[mode].get('status') or f'{rows[mode][metric]:.4f} {metric}'}", flush=True)
    tot = {k: sum(v[k] for v in record["classes"].values()) for k in ("pool", "heldout")}
    rows = {k: rows[k] for k in ROWS if k in rows}
    return {
        **tot,
        "classes": len(record["classes"]),
        "spec": record["spec"],
        "source": record["source"],
        "installed": record["installed"],
        "rows": rows,
        "target_metric": metric,
        "targets": targets(rows, metric, set_dir, seed),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(BUILDERS), help=f"comma list of {', '.join(BUILDERS)}")
    ap.add_argument("--modes", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--out", default=str(REPO / "cache" / "bench"), help="sets, row projects and transfer.json")
    ap.add_argument(
        "--budget-minutes", type=float, default=None, help="start no row after this; stop a graft row at it"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--auto-budget-minutes", type=float, default=None, help="train.budget_minutes of the auto rows")
    ap.add_argument("--target-metric", choices=("macro_f1", "accuracy"), default="macro_f1")
    ap.add_argument("--show", action="store_true", help="print the tables of <out>/transfer.json; run nothing")
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = Path(args.out).resolve()
    deadline = None if args.budget_minutes is None else time.monotonic() + 60 * args.budget_minutes
    try:
        bad = [m for m in modes if m not in ROWS] + [s for s in sets if s not in BUILDERS]
        if bad:
            raise GraftError(f"unknown set or mode {bad[0]!r}: sets {', '.join(BUILDERS)}; modes {', '.join(ROWS)}")
        results_path = out / "transfer.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        if args.show:
            print("\n\n".join(format_table(k, v) for k, v in results.items() if k in sets))
            return 0
        check_sources(sets, out, args.seed)  # every set's Debian package, before the first set's rows run
        for name in sets:
            results[name] = run_set(
                name, out, modes, args.seed, deadline, args.target_metric, results.get(name), args.auto_budget_minutes
            )
            write_json(results_path, results)  # after each set: a later failure keeps the finished ones
            print(format_table(name, results[name]) + "\n", flush=True)
    except GraftError as exc:
        print(f"transfer: error: {exc}", file=sys.stderr)
        return 2
    print(f"rows written to {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
