"""What graft prints for people: a short line per stage summary, and which command makes a missing input.

The full summaries stay machine-readable: ``graft <stage> --json`` prints them as one JSON object, and
the stages write their figures to ``metrics/`` anyway. Nothing here imports torch or prefect.
"""

from __future__ import annotations

import re
from pathlib import Path

# The file name of each stage output -> the command that writes it (the hint when one is missing).
MADE_BY = {
    "manifest.parquet": "ingest",
    "classes.json": "ingest",
    "quarantine.csv": "ingest",
    "features.parquet": "featurize",
    "model.pt": "train",
    "leaderboard.csv": "train",
    "train.json": "train",
    "curves.csv": "train",
    "metrics.json": "evaluate",
    "evaluation.json": "evaluate",
    "confusion.csv": "evaluate",
    "report.md": "evaluate",
    "model.onnx": "export",
    "model.int8.onnx": "export",
    "export.json": "export",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def screen(text: object, limit: int = 200) -> str:
    """``text`` safe for one terminal line: control characters escaped (a label holding a tab or a newline
    cannot break the columns), capped at ``limit`` characters."""
    s = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def missing_hint(path: str | Path, made_by: str | None = None) -> str:
    """``<path> not found: run `graft <stage>` (or `dvc repro`) first``, or a plain "check the path"."""
    stage = made_by or MADE_BY.get(Path(path).name)
    if stage:
        return f"{path} not found: run `graft {stage}` (or `dvc repro`) first, or pass the right path"
    return f"{path} not found: check the path"


def _n(x: object, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _kb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def stage_line(name: str, s: dict) -> str:
    """One short line for a stage's summary (the dict its function returns); key by key if its shape is new."""
    try:
        return _stage_line(name, s)
    except (KeyError, TypeError, ValueError):
        return f"{name}: " + ", ".join(f"{k} {_n(v)}" for k, v in s.items() if not isinstance(v, (dict, list)))


def _stage_line(name: str, s: dict) -> str:
    if name == "ingest":
        return (
            f"ingest: {s['images']} images in {s['classes']} classes (train {s['train']}, val {s['val']}, "
            f"test {s['test']}); {s['quarantined']} quarantined, {s['duplicate_images']} duplicates"
        )
    if name == "featurize":
        rate = f", {s['img_per_s']:.0f} img/s" if s.get("img_per_s") else ""
        return (
            f"featurize: {s['images']} images, {s['computed']} computed, {s['from_cache']} from the cache "
            f"({s['backbone']}{', ' + s['engine'] if s.get('engine') else ''}{rate})"
        )
    if name == "train":
        if s.get("mode") == "auto":
            return (
                f"train: auto chose {s['chosen']} (held-out macro-F1 {_n(s['val_macro_f1'])} ± "
                f"{_n(s['val_macro_f1_se'])}, {s['scored_on']}); {s['ran']} of {s['candidates']} candidates ran"
                + (f" in {s['seconds']:.0f} s" if "seconds" in s else "")
            )
        what = f"fine-tune ({s.get('strategy')})" if s.get("mode") == "finetune" else f"{s.get('head')} head"
        return (
            f"train: {what}, best epoch {s['best_epoch']} of {s['epochs']}: "
            f"val accuracy {_n(s['val_accuracy'])}, val loss {_n(s['val_loss'])}"
        )
    if name == "evaluate":
        m, b, vs = s["model"], s["baseline"], s["vs_baseline"]
        return (
            f"evaluate: {s['model_name']}: accuracy {_n(m['accuracy'])}, macro-F1 {_n(m['macro_f1'])} "
            f"(raw-pixel baseline {_n(b['accuracy'])}, {_n(b['macro_f1'])}; n={m['n']}): {vs['verdict']}"
        )
    if name == "export":
        line = f"export: {s['onnx']} ({_kb(s['bytes'])}, matches torch within {s['atol']:g})"
        if s.get("int8"):
            drop = s.get("int8_accuracy_drop")
            line += (
                f"; int8 {s['int8']} ({_kb(s['int8_bytes'])}, {s['int8_speedup_batch_32']:.2f}x fp32 speed at batch 32"
                + (f", accuracy drop {drop:+.4f}" if drop is not None else "")
                + ")"
            )
        return line
    raise KeyError(name)


def flow_lines(summary: dict) -> list[str]:
    """A pipeline flow's summary, one line per stage (the evaluate line from the ``metrics`` rows)."""
    lines = [stage_line(k, v) for k, v in summary.items() if isinstance(v, dict) and k != "evaluate"]
    if summary.get("metrics"):
        lines.append("evaluate (test split):")
    for row in summary.get("metrics", []):
        lines.append(
            f"  {row['model']}: accuracy {_n(row['accuracy'])}, macro-F1 {_n(row['macro_f1'])}, "
            f"balanced accuracy {_n(row['balanced_accuracy'])}, ECE {_n(row['ece'])}, n={row['n']}"
        )
    return lines


def prediction_lines(records: list[dict], top_k: int) -> list[str]:
    """``graft predict`` on screen: per file ``path, predicted, confidence[, runner-up, its confidence ...]``
    separated by tabs, confidences to 3 decimals; an unreadable file is ``path, ERROR, why``."""
    lines = []
    for r in records:
        if r["error"] is not None:
            lines.append(f"{screen(r['path'])}\tERROR\t{screen(r['error'])}")
            continue
        cells = [screen(r["predicted"]), f"{r['confidence']:.3f}"]
        if r.get("predicted") != r.get("best_guess") and r.get("best_guess") is not None:  # "unknown"
            cells.append(f"(best guess {screen(r['best_guess'])}, in-distribution score {r['in_distribution']:.3f})")
        for rank in range(2, top_k + 1):
            if r.get(f"top{rank}_label") is not None:
                cells += [screen(r[f"top{rank}_label"]), f"{r[f'top{rank}_confidence']:.3f}"]
        lines.append("\t".join([screen(r["path"]), *cells]))
    return lines
