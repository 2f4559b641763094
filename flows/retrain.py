"""Retrain on new target-domain data: re-ingest, diff, train a challenger, gate it, promote or reject.

Every decision (including "unchanged") is appended to ``models/history.parquet`` and published as
a Markdown artifact. The workspace lock makes overlapping scheduled runs queue or refuse.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from graft.baseline import gate
from graft.dataset import data_hash, read_classes, read_manifest
from graft.drift import batch_drift
from graft.lock import workspace_lock
from graft.params import Params, load_params
from graft.stages import run_stage
from graft.tasks.retrain import (
    DataDiff,
    append_history,
    challenger_params,
    check_class_change,
    comparison_markdown,
    diff_manifests,
    gate_test_set,
    load_champion,
    onnx_metrics_task,
    promote,
    restore_promotion,
)


def train_challenger(params: Params) -> tuple[Params, dict, list[dict]]:
    """Train, evaluate and export a challenger; escalate a weak head to a fine-tune as configured.

    Returns the params of the chosen challenger (its output folder), its evaluation metrics, and one row
    per challenger considered (for the report: val and test side by side, and why one was chosen).
    """
    rp = params.retrain
    candidates = []
    if params.train.mode == "auto":  # auto compares head, fine-tune and the rest on held-out data itself
        auto_p = challenger_params(params, "challenger")
        run_stage("train", auto_p, as_task=True)
        metrics = run_stage("evaluate", auto_p, as_task=True)
        return *_export(auto_p, metrics), auto_rows(auto_p, metrics)
    why = "train.mode: finetune"
    if params.train.mode == "head":
        head_p = challenger_params(params, "challenger")
        candidates.append(
            (head_p, run_stage("train", head_p, as_task=True), run_stage("evaluate", head_p, as_task=True))
        )
        score = candidates[0][1]["val_accuracy"]  # validation, not test: the gate judges on test
        if rp.escalate_below_val_accuracy is None or score >= rp.escalate_below_val_accuracy:
            why = (
                "train.mode: head; no fine-tune (retrain.escalate_below_val_accuracy is null)"
                if rp.escalate_below_val_accuracy is None
                else f"head val accuracy {score:.4f} >= retrain.escalate_below_val_accuracy: no fine-tune"
            )
            return *_export(head_p, candidates[0][2]), challenger_rows(candidates, head_p, why)
        print(
            f"head challenger val accuracy {score:.4f} < retrain.escalate_below_val_accuracy "
            f"{rp.escalate_below_val_accuracy:g}: fine-tuning ({rp.escalation})"
        )
        why = f"head val accuracy {score:.4f} < retrain.escalate_below_val_accuracy: fine-tuned too"
        if rp.escalation == "finetune_instead":
            candidates.clear()
    ft_p = challenger_params(params, "challenger-finetune")
    ft_p = ft_p.model_copy(update={"train": ft_p.train.model_copy(update={"mode": "finetune"})})
    candidates.append((ft_p, run_stage("train", ft_p, as_task=True), run_stage("evaluate", ft_p, as_task=True)))
    # The better by validation accuracy (never by test, which the gate is about to use).
    chosen_p, _, metrics = max(candidates, key=lambda c: c[1]["val_accuracy"])
    if len(candidates) > 1:
        why += "; the higher val accuracy wins (test is kept for the gate)"
    return *_export(chosen_p, metrics), challenger_rows(candidates, chosen_p, why)


def challenger_rows(candidates: list[tuple[Params, dict, dict]], chosen: Params, why: str) -> list[dict]:
    """One report row per (params, train summary, evaluation) challenger: val and test side by side."""
    return [
        {
            "challenger": "fine-tune" if p.train.mode == "finetune" else f"{p.train.head} head",
            "model": m["model_name"],
            "val": f"accuracy {t['val_accuracy']:.4f}",
            "test_accuracy": m["model"]["accuracy"],
            "test_macro_f1": m["model"]["macro_f1"],
            "chosen": p is chosen,
            "why": why if p is chosen else "",
        }
        for p, t, m in candidates
    ]


def auto_rows(params: Params, metrics: dict) -> list[dict]:
    """The report rows of auto's candidates (its leaderboard): held-out score, test figures for the chosen."""
    board = Path(params.evaluate.metrics_dir) / "leaderboard.csv"
    rows = []
    for r in pd.read_csv(board).to_dict("records") if board.is_file() else []:
        chosen = str(r.get("chosen")) == "True"
        scored = "" if pd.isna(r.get("score")) else f"macro-F1 {r['score']:.4f} ({r.get('scored_on')})"
        rows.append(
            {
                "challenger": r["candidate"],
                "model": metrics["model_name"] if chosen else "",
                "val": scored or str(r.get("note") or "did not run"),
                "test_accuracy": metrics["model"]["accuracy"] if chosen else None,
                "test_macro_f1": metrics["model"]["macro_f1"] if chosen else None,
                "chosen": chosen,
                "why": "train.mode: auto: the best held-out macro-F1 within one standard error, cheapest first"
                if chosen
                else "",
            }
        )
    return rows


def _export(chosen_p: Params, metrics: dict) -> tuple[Params, dict]:
    run_stage("export", chosen_p, as_task=True)
    return chosen_p, metrics


@flow(name="graft-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", wait_s: float | None = None) -> dict:
    """Retrain when the target data changed; promote the challenger only if it passes the gate."""
    with workspace_lock(params_path, wait_s):
        return _retrain(load_params(params_path))


def _retrain(params: Params) -> dict:
    rp = params.retrain
    out = Path(params.data.out_dir)
    champion = load_champion(rp)
    if champion and restore_promotion(Path(rp.history), champion):
        print(f"history: restored the promotion row of champion {champion['version']} (its run was interrupted)")
    run_stage("ingest", params, as_task=True)
    manifest = read_manifest(out)
    classes = read_classes(out)
    diff = diff_manifests(champion["manifest"] if champion else None, manifest)
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": params.train.mode,
        "data_sha256": data_hash(manifest),
        "added": diff.added,
        "removed": diff.removed,
        "relabelled": diff.relabelled,
        "features_computed": 0,
        "champion": champion["version"] if champion else None,
    }
    if champion and not diff.changed:
        row.update(
            decision="unchanged", reason=f"nothing changed since champion {champion['version']} ({diff.moved} moved)"
        )
        return _record(rp, row, diff, None, None)
    if champion:
        check_class_change(diff, rp)
    row["features_computed"] = run_stage("featurize", params, as_task=True)["computed"]
    row.update(batch_drift(params, champion, manifest))  # the new images against the champion's, before training
    chosen, metrics, challengers = train_challenger(params)
    kind = "finetune" if chosen.train.mode == "finetune" else "head"
    row["kind"] = kind
    gate_rows = gate_test_set(manifest, champion["manifest"] if champion else None)
    root = Path(params.data.root)
    challenger = onnx_metrics_task(Path(chosen.export.out), gate_rows, root, classes)
    champ = onnx_metrics_task(Path(champion["dir"]) / "model.onnx", gate_rows, root, classes) if champion else None
    row.update(
        gate_test_images=len(gate_rows),
        challenger_macro_f1=challenger["macro_f1"],
        challenger_accuracy=challenger["accuracy"],
    )
    if champ:
        row.update(champion_macro_f1=champ["macro_f1"], champion_accuracy=champ["accuracy"])
        ok, reason = gate(challenger, champ, rp)
    else:
        ok, reason = True, "first model: no champion to beat"
    row.update(decision="promoted" if ok else "rejected", reason=reason)
    if ok:
        meta = {
            "promoted_at": row["time"],
            "kind": kind,
            "data_sha256": row["data_sha256"],
            "classes": classes,
            "test_metrics": {k: metrics["model"][k] for k in ("accuracy", "macro_f1")},
            "gate_metrics": {k: challenger[k] for k in ("accuracy", "macro_f1", "balanced_accuracy")},
            "history_row": dict(row),  # written with the version: a kill before append_history cannot lose it
        }
        version = promote(rp, Path(chosen.train.model_dir), Path(chosen.export.out), manifest, classes, meta)
        row["champion"] = version.name
    return _record(rp, row, diff, challenger, champ, challengers)


def _record(
    rp, row: dict, diff: DataDiff, challenger: dict | None, champion: dict | None, challengers: list | None = None
) -> dict:
    history = append_history(Path(rp.history), row)
    md = comparison_markdown(row, diff, challenger, champion, challengers)
    create_markdown_artifact(md, key="graft-retrain", description=f"retrain decision: {row['decision']}")
    print(md)
    return {**row, "history_rows": len(history)}


if __name__ == "__main__":
    retrain()
