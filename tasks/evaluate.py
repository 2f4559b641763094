"""Evaluate: test-split metrics for the model and, beside them, a raw-pixel baseline.

The baseline (logistic regression on downscaled grey pixels) tells a user whether transfer helps
at all on their data; ImageNet features can lose to raw pixels on small grey images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from graft import GraftError
from graft.atomic import write_csv, write_json, write_text
from graft.cache import load_feature_table, select_columns, tap_columns
from graft.compare import compare, comparison_sentence
from graft.dataset import read_classes, read_manifest, split_arrays, split_items
from graft.images import load_rgb
from graft.labels import label_review
from graft.leakage import leakage_markdown, leakage_report
from graft.metrics import classification_metrics
from graft.model import head_from_payload, load_model, model_name
from graft.params import Params
from graft.plots import plot_confusion, plot_curves, plot_reliability
from graft.tasks import stage_task
from graft.text import csv_unescape, md_cell
from graft.trust import reliability_table, trust_metrics, unknown_report


def pixel_matrix(paths: list[Path], size: int) -> np.ndarray:
    """Images as flattened size x size grey pixels in [0, 1] (the baseline's input)."""
    out = np.empty((len(paths), size * size), np.float32)
    for i, p in enumerate(paths):
        img = load_rgb(p, min_side=size)[0].convert("L").resize((size, size), resample=3, reducing_gap=2.0)
        out[i] = np.asarray(img, np.float32).ravel() / 255.0
    return out


def raw_pixel_baseline(
    manifest: pd.DataFrame, root: Path, classes: list[str], size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fit logistic regression on train-split raw pixels; return test labels and probabilities."""
    index = {c: i for i, c in enumerate(classes)}
    tr, te = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(pixel_matrix([root / p for p in tr["path"]], size), tr["label"].map(index))
    proba = np.zeros((len(te), len(classes)))
    proba[:, clf.classes_] = clf.predict_proba(pixel_matrix([root / p for p in te["path"]], size))
    return te["label"].map(index).to_numpy(), proba


def model_test_logits(
    params: Params, manifest: pd.DataFrame, classes: list[str]
) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """Test labels, the trained model's logits (on cached features, or images through the whole model), its
    name and its model file."""
    payload = load_model(Path(params.train.model_dir) / "model.pt")
    name = model_name(payload)
    if payload["classes"] != classes:
        new, gone = sorted(set(classes) - set(payload["classes"])), sorted(set(payload["classes"]) - set(classes))
        raise GraftError(
            f"model classes differ from data/classes.json (new in the data: {new or 'none'}; "
            f"only in the model: {gone or 'none'}): rerun train, or fine-tune from the old model "
            "with train.init_from to keep what it learned"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = manifest.loc[manifest["split"] == "test", "label"].map(index).to_numpy(np.int64)
    feats, meta = load_feature_table(params.featurize.out) if Path(params.featurize.out).is_file() else ({}, {})
    if payload["kind"] == "finetune" or payload["backbone"]["name"] != meta.get("graft.backbone"):
        from graft.tune import classifier_logits  # images through the whole model: no cached features of it

        paths, _ = split_items(manifest, params.data.root, classes, "test")
        return y, classifier_logits(payload, paths), name, payload
    x, _ = split_arrays(manifest, feats, classes, "test")
    x = select_columns(x, tap_columns(meta, payload["backbone"].get("taps", ["last"])))
    with torch.no_grad():
        logits = head_from_payload(payload)(torch.from_numpy(x).float()).numpy()
    return y, logits, name, payload


def _model_info(params: Params) -> dict:
    """Which candidate auto chose, with what settings, fitted on what; the leaderboard rows."""
    payload = load_model(Path(params.train.model_dir) / "model.pt")
    info: dict = {
        "candidate": payload.get("candidate"),
        "settings": json.dumps(payload.get("settings", {})),
        "fit": payload.get("fit", "train (early stopping on val)").replace("+", " + "),
        "final_fit": payload["final"]["fit"].replace("+", " + ") if payload.get("final") else None,
    }
    board = Path(params.evaluate.metrics_dir) / "leaderboard.csv"
    if board.is_file():
        info["leaderboard"] = pd.read_csv(board).to_dict("records")
    return info


HEADLINE = ("accuracy", "macro_f1", "balanced_accuracy", "ece", "n")


def headline(metrics: dict, board: list[dict] | None = None) -> dict:
    """The DVC metrics (``metrics.json``): the figures worth a column in ``dvc exp show``, all deterministic.

    The model's headline scores at the top level (short column names), the baseline's under
    ``baseline``, the model-minus-baseline macro-F1 with its 95% interval and verdict under
    ``vs_baseline``, and the candidate the train stage chose with its held-out macro-F1. Per-class
    figures, names and sentences go to ``evaluation.json`` beside it (not a DVC metric).
    """
    vs = metrics["vs_baseline"]
    out: dict = {
        **{k: metrics["model"][k] for k in HEADLINE},
        "baseline": {k: metrics["baseline"][k] for k in HEADLINE},
        "vs_baseline": {
            "f1_diff": round(vs["diff"], 4),
            "ci_low": round(vs["lo"], 4),
            "ci_high": round(vs["hi"], 4),
            "verdict": vs["verdict"],
        },
    }
    chosen = next((r for r in board or [] if str(r.get("chosen")) == "True"), None)
    if chosen:
        out["chosen"] = chosen["candidate"]
        if not pd.isna(chosen.get("score")):
            out["chosen_heldout_f1"] = round(float(chosen["score"]), 4)
    return out


def _cell(text: str) -> str:
    """A Markdown table cell: a label is shown as typed (no table break, HTML tag or link; graft.text)."""
    return md_cell(text)


def report_markdown(metrics: dict, info: dict | None = None) -> str:
    m, b = metrics["model"], metrics["baseline"]
    rows = "\n".join(
        f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['balanced_accuracy']:.4f} | {r['ece']:.4f} |"
        for name, r in (
            (metrics["model_name"], m),
            (f"baseline: raw pixels {metrics['baseline_size']}x{metrics['baseline_size']} + logreg", b),
        )
    )
    verdict = metrics["vs_baseline"]["sentence"]
    if metrics["vs_baseline"]["verdict"] != "wins":
        verdict += (
            "\n\n**Transfer does not beat the raw-pixel baseline here as configured.** With "
            "`train.mode: auto` graft tries the pixel model itself and ships it when it is as good."
        )
    per_class = "\n".join(
        f"| {_cell(c)} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for c, v in m["per_class"].items()
    )
    counts = ", ".join(f"{k}: {v}" for k, v in metrics["counts"].items())
    return (
        f"# graft evaluation\n\nTest split ({m['n']} images). Images per split: {counts}.\n\n"
        f"| model | accuracy | macro-F1 | balanced acc. | ECE |\n|---|---|---|---|---|\n{rows}\n\n{verdict}\n\n"
        f"{_which_model(info or {})}## Per class (model)\n\n"
        f"| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n"
    )


def _which_model(w: dict) -> str:
    """What the metrics describe (auto's choice, what it was fitted on) and auto's leaderboard, if any."""
    lines = []
    if w.get("candidate"):
        lines.append(
            f"`train.mode: auto` chose **{_cell(w['candidate'])}** ({_cell(w.get('settings', ''))}); "
            f"the metrics above describe it refit on {w.get('fit', 'train')}."
        )
    if w.get("final_fit"):
        lines.append(
            f"The exported model was refit once more on {w['final_fit']} (`train.refit: all`) after these "
            "test metrics were recorded: no test score exists for it by construction."
        )
    board = (w.get("leaderboard") or []) if w.get("candidate") else []  # one-row boards of head/finetune: no table
    if board:
        lines += [
            "",
            "| candidate | held-out macro-F1 | ± SE | CV std | scored on | ONNX MB | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in board:
            score = "" if pd.isna(r.get("score")) else f"{r['score']:.4f}"
            se, std = ("" if pd.isna(r.get(k)) else f"{r[k]:.4f}" for k in ("se", "cv_std"))
            mb = "" if pd.isna(r.get("onnx_bytes")) else f"{r['onnx_bytes'] / 1e6:.2f}"
            name = f"**{r['candidate']}**" if r.get("chosen") else r["candidate"]
            scored_on, note = (_cell(v) if isinstance(v, str) else "" for v in (r.get("scored_on"), r.get("note")))
            lines.append(f"| {name} | {score} | {se} | {std} | {scored_on} | {mb} | {note} |")
        lines += [
            "",
            "Train time and batch-1 latency per candidate: `leaderboard_timings.csv` beside the metrics "
            "(wall-clock figures change on every run, so no DVC-tracked file holds them).",
        ]
    return ("## Model selection\n\n" + "\n".join(lines) + "\n\n") if lines else ""


def _all_features(path: str) -> tuple[dict, dict]:
    return load_feature_table(path) if Path(path).is_file() else ({}, {})


def _read_quarantine(out: Path) -> pd.DataFrame | None:
    path = out / "quarantine.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False).map(csv_unescape) if path.is_file() else None


def _features_if_any(path: str) -> dict[str, np.ndarray] | None:
    """The usual pooled features for the leakage check (its threshold is tuned on them); None without a table."""
    if not Path(path).is_file():
        return None
    feats, meta = load_feature_table(path)
    columns = tap_columns(meta, ("last",))
    return {k: v[columns] if len(columns) else v for k, v in feats.items()}


def evaluate(params: Params) -> dict:
    """Run the evaluate stage: metrics.json, confusion data and PNG, leakage.csv and the Markdown report."""
    ep = params.evaluate
    out = Path(params.data.out_dir)
    manifest = read_manifest(out)
    classes = read_classes(out)
    if not (manifest["split"] == "test").any():
        raise GraftError("the test split is empty: add images or raise data.split.test")
    y, logits, model_name, payload = model_test_logits(params, manifest, classes)
    calibration = payload.get("calibration") or {}
    proba = softmax(logits / float(calibration.get("temperature", 1.0)), axis=1)  # what the exported graph gives
    yb, proba_b = raw_pixel_baseline(manifest, Path(params.data.root), classes, ep.baseline_size, params.seed)
    model_metrics = classification_metrics(y, proba, classes, ep.ece_bins)
    baseline = classification_metrics(yb, proba_b, classes, ep.ece_bins)
    baseline.pop("per_class")
    vs = compare(y, proba.argmax(1), proba_b.argmax(1), "macro_f1", seed=params.seed)
    vs["sentence"] = comparison_sentence(model_name, "the raw-pixel baseline", vs)
    metrics = {
        "model_name": model_name,
        "vs_baseline": vs,
        "model": model_metrics,
        "baseline": baseline,
        "baseline_size": ep.baseline_size,
        "counts": {s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        "calibration": (trust := trust_metrics(logits, y, calibration, ep.ece_bins)),
        "unknown": unknown_report(params, payload, manifest, classes, *_all_features(params.featurize.out), logits),
    }
    mdir, pdir = Path(ep.metrics_dir), Path(ep.plots_dir)
    leakage = leakage_report(params, manifest, _read_quarantine(out), _features_if_any(params.featurize.out))
    metrics["leakage"] = {k: v for k, v in leakage.items() if k not in ("top", "exact")}
    metrics["label_review"], review_md = label_review(params, manifest, classes, y, proba)
    info = _model_info(params)
    write_json(mdir / "metrics.json", headline(metrics, info.get("leaderboard")))
    write_json(mdir / "evaluation.json", metrics)
    pred = proba.argmax(1)
    write_csv(
        mdir / "confusion.csv",
        pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}),
    )
    plot_confusion(pdir / "confusion.png", y, pred, classes)
    reliability = pd.DataFrame(reliability_table(y, proba, ep.ece_bins))
    write_csv(mdir / "reliability.csv", reliability)
    plot_reliability(pdir / "reliability.png", reliability, trust)
    plot_curves(mdir / "curves.csv", pdir / "curves.png")  # train's curves: drawn here, where matplotlib is loaded
    write_text(
        ep.report,
        report_markdown(metrics, info)
        + "\n"
        + leakage_markdown(leakage, (out / "leakage.csv").as_posix())
        + "\n"
        + review_md,
    )
    return metrics


evaluate_task = stage_task(evaluate, "evaluate")
