"""Retraining logic: diff the data, judge a challenger against the champion, promote atomically, keep history.

``models/champion`` is a symlink to a complete, immutable version folder
(``models/versions/<timestamp>-<hash>/``: ONNX model, model.pt, metrics, manifest, class map,
meta). Promotion writes the new version in full, then swaps the link with ``os.replace``, so a
reader (``graft predict --model models/champion/model.onnx``, a server) sees the old champion or
the new one, never half of one.

The gate compares the two models on the *trusted* test set: test-split images that the champion
was already evaluated on. Splits come from content hashes, so those images never move; new test
images are reported beside, but do not decide, so a batch of mislabelled arrivals cannot vote for
the challenger trained on it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from graft import GraftError
from graft.atomic import write_json, write_parquet
from graft.drift import drift_markdown
from graft.history import HISTORY_SCHEMA, append_history, restore_promotion  # noqa: F401 - the flow's names
from graft.params import Params, RetrainParams
from graft.tasks import stage_task

CHAMPION_FILES = ("model.onnx", "model.pt")


@dataclass
class DataDiff:
    """What changed between the champion's manifest and the new one."""

    added: int = 0
    removed: int = 0
    relabelled: int = 0
    moved: int = 0  # same bytes at another path: costs nothing, retrains nothing
    new_classes: list[str] = field(default_factory=list)
    removed_classes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.relabelled or self.new_classes or self.removed_classes)


def diff_manifests(old: pd.DataFrame | None, new: pd.DataFrame) -> DataDiff:
    """Compare two manifests by content: (sha256, label) pairs, classes and paths."""
    if old is None or old.empty:
        return DataDiff(added=int(new["sha256"].nunique()), new_classes=sorted(new["label"].unique()))
    old_pairs = set(zip(old["sha256"], old["label"], strict=True))
    new_pairs = set(zip(new["sha256"], new["label"], strict=True))
    old_sha, new_sha = set(old["sha256"]), set(new["sha256"])
    relabelled = {s for s, _ in new_pairs - old_pairs if s in old_sha}
    moved = set(zip(new["sha256"], new["path"], strict=True)) - set(zip(old["sha256"], old["path"], strict=True))
    return DataDiff(
        added=len(new_sha - old_sha),
        removed=len(old_sha - new_sha),
        relabelled=len(relabelled),
        moved=len({s for s, _ in moved if s in old_sha and s not in relabelled}),
        new_classes=sorted(set(new["label"]) - set(old["label"])),
        removed_classes=sorted(set(old["label"]) - set(new["label"])),
    )


def check_class_change(diff: DataDiff, rp: RetrainParams) -> None:
    """A new or vanished class changes the model's contract: only with ``retrain.allow_class_change``."""
    if (diff.new_classes or diff.removed_classes) and not rp.allow_class_change:
        parts = [
            f"new class(es) {diff.new_classes}" if diff.new_classes else "",
            f"removed class(es) {diff.removed_classes}" if diff.removed_classes else "",
        ]
        raise GraftError(
            f"{' and '.join(p for p in parts if p)} against the champion's class map; "
            "set retrain.allow_class_change: true to accept them"
        )


# --- the champion


def champion_dir(rp: RetrainParams) -> Path:
    return Path(rp.models_dir) / "champion"


def load_champion(rp: RetrainParams) -> dict | None:
    """The champion's meta (with its manifest as a DataFrame), or None before the first promotion.

    Fails closed: a ``champion`` link that exists but names no complete, readable version is an error,
    never "no champion" (which would promote the challenger without the gate).
    """
    d = champion_dir(rp)
    if not os.path.lexists(d):
        return None
    target = f"{d} -> {os.readlink(d)}" if d.is_symlink() else str(d)
    fix = f"restore it, or remove {d} to start over without a champion"
    if not d.is_dir():
        raise GraftError(f"champion {target} is not a version folder (dangling link?): {fix}")
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("version"), str):
            raise ValueError("not a mapping with a version")
        meta["manifest"] = pd.read_parquet(d / "manifest.parquet")
    except (OSError, ValueError) as exc:
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc).splitlines()[0]
        where = exc.filename if isinstance(exc, OSError) and exc.filename else d / "meta.json"
        raise GraftError(f"champion {target} is unreadable ({where}: {why}): {fix}") from None
    meta["dir"] = str(d.resolve())
    return meta


def promote(
    rp: RetrainParams, model_dir: Path, onnx_path: Path, manifest: pd.DataFrame, classes: list[str], meta: dict
) -> Path:
    """Copy the challenger into a new version folder, then atomically point ``champion`` at it."""
    versions = Path(rp.models_dir) / "versions"
    ns = time.time_ns()  # names sort in promotion order, even within one second
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(ns // 10**9))}.{ns % 10**9:09d}-{uuid.uuid4().hex[:6]}"
    meta = {**meta, "version": name}
    staging = versions / f".{name}.tmp"
    staging.mkdir(parents=True)
    try:
        shutil.copy2(onnx_path, staging / "model.onnx")
        shutil.copy2(model_dir / "model.pt", staging / "model.pt")
        write_parquet(staging / "manifest.parquet", manifest)
        write_json(staging / "classes.json", {"classes": classes})
        write_json(staging / "meta.json", meta)
        os.replace(staging, versions / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link = champion_dir(rp)
    tmp_link = link.with_name(f".champion-{uuid.uuid4().hex[:8]}")
    os.symlink(Path("versions") / name, tmp_link)
    os.replace(tmp_link, link)  # atomic: readers see the old or the new champion
    prune_versions(versions, keep=rp.keep_versions, current=name)
    return versions / name


def prune_versions(versions: Path, keep: int, current: str) -> None:
    """Remove all but the newest ``keep`` version folders (never the current one)."""
    names = sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in names[:-keep]:
        if old != current:
            shutil.rmtree(versions / old, ignore_errors=True)


# --- judging


def gate_test_set(new: pd.DataFrame, champion_manifest: pd.DataFrame | None) -> pd.DataFrame:
    """Trusted test rows: test-split (sha256, label) pairs the champion was evaluated on too."""
    test = new[new["split"] == "test"]
    if champion_manifest is None:
        return test
    known = set(
        zip(
            champion_manifest.loc[champion_manifest["split"] == "test", "sha256"],
            champion_manifest.loc[champion_manifest["split"] == "test", "label"],
            strict=True,
        )
    )
    return test[[pair in known for pair in zip(test["sha256"], test["label"], strict=True)]]


def onnx_metrics(onnx_path: Path, rows: pd.DataFrame, root: Path, classes: list[str]) -> dict:
    """Metrics of an exported model on ``rows``, in the class order of ``classes``.

    A model that lacks a class (an older champion) simply never predicts it.
    """
    from graft.metrics import classification_metrics
    from graft.predict import OnnxClassifier, predict_proba

    model = OnnxClassifier(onnx_path)
    index = {c: i for i, c in enumerate(classes)}
    proba = np.zeros((len(rows), len(classes)), np.float64)
    if len(rows):
        got = predict_proba(model, [root / p for p in rows["path"]])
        for j, c in enumerate(model.classes):
            if c in index:
                proba[:, index[c]] = got[:, j]
    return classification_metrics(rows["label"].map(index).to_numpy(np.int64), proba, classes)


def comparison_markdown(
    row: dict, diff: DataDiff, challenger: dict | None, champion: dict | None, challengers: list[dict] | None = None
) -> str:
    """The decision and the two models' metrics side by side; then every challenger considered (val and
    test) and why one was chosen."""
    lines = [
        f"# graft retrain: **{row['decision']}**",
        "",
        row["reason"],
        "",
        f"Data: +{diff.added} added, -{diff.removed} removed, {diff.relabelled} relabelled, {diff.moved} moved; "
        f"new classes {diff.new_classes or 'none'}; features computed: {row.get('features_computed', 0)}.",
        "",
        drift_markdown(row),
    ]
    if challenger:
        lines += [
            f"Gate test set: {row['gate_test_images']} trusted test images.",
            "",
            "| model | accuracy | macro-F1 | balanced acc. |",
            "|---|---|---|---|",
        ]
        for name, m in (("challenger", challenger), ("champion", champion)):
            if m:
                lines.append(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['balanced_accuracy']:.4f} |")
    if challengers:
        lines += ["", "## Challengers", "", "| challenger | validation | test accuracy | test macro-F1 | chosen |"]
        lines.append("|---|---|---|---|---|")
        for c in challengers:
            test = [f"{c[k]:.4f}" if isinstance(c.get(k), float) else "" for k in ("test_accuracy", "test_macro_f1")]
            name = str(c["challenger"]).replace("|", "\\|")
            lines.append(f"| {name} | {c['val']} | {test[0]} | {test[1]} | {'**yes**' if c['chosen'] else ''} |")
        lines += ["", *(f"Why: {c['why']}." for c in challengers if c.get("why"))]
    return "\n".join(lines) + "\n"


def challenger_params(params: Params, name: str) -> Params:
    """Params whose train/evaluate/export outputs land in ``<models_dir>/<name>/``, not the workspace's."""
    base = Path(params.retrain.models_dir) / name
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"model_dir": str(base)}),
            "evaluate": params.evaluate.model_copy(
                update={
                    "metrics_dir": str(base / "metrics"),
                    "plots_dir": str(base / "plots"),
                    "report": str(base / "report.md"),
                }
            ),
            "export": params.export.model_copy(update={"out": str(base / "model.onnx")}),
        }
    )


onnx_metrics_task = stage_task(onnx_metrics, "gate-metrics")
