"""Retraining: data diff, gate, atomic promotion, history, escalation, and a simulated week of arrivals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from graft import GraftError
from graft.baseline import gate
from graft.params import RetrainParams
from graft.tasks.retrain import diff_manifests, gate_test_set, load_champion, promote
from tests.helpers import make_params, write_tree


def manifest(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "sha256", "label", "split"])


def test_diff_counts_added_removed_relabelled_moved_and_classes() -> None:
    """The diff is by content: a moved file is not a change, a relabelled one is."""
    old = manifest([("a/1.png", "h1", "a", "train"), ("a/2.png", "h2", "a", "test"), ("b/3.png", "h3", "b", "train")])
    new = manifest(
        [("a/1-renamed.png", "h1", "a", "train"), ("b/2.png", "h2", "b", "test"), ("c/4.png", "h4", "c", "val")]
    )
    d = diff_manifests(old, new)
    assert (d.added, d.removed, d.relabelled, d.moved) == (1, 1, 1, 1)
    assert d.new_classes == ["c"] and d.removed_classes == [] and d.changed
    assert not diff_manifests(old, old).changed
    assert not diff_manifests(old, old.assign(path=old["path"] + ".moved")).changed


def test_gate_tolerates_small_drops_and_rejects_a_class_collapse() -> None:
    """Macro-F1 within the tolerance passes; a class whose recall collapses fails, with a reason."""
    rp = RetrainParams(max_macro_f1_drop=0.02, max_class_recall_drop=0.2)
    champ = {"macro_f1": 0.90, "per_class": {"a": {"recall": 0.9, "support": 10}, "b": {"recall": 0.9, "support": 10}}}
    ok, _ = gate({"macro_f1": 0.89, "per_class": {"a": {"recall": 0.85}, "b": {"recall": 0.9}}}, champ, rp)
    assert ok
    ok, why = gate({"macro_f1": 0.85, "per_class": champ["per_class"]}, champ, rp)
    assert not ok and "macro-F1" in why
    ok, why = gate({"macro_f1": 0.91, "per_class": {"a": {"recall": 0.6}, "b": {"recall": 1.0}}}, champ, rp)
    assert not ok and "'a'" in why


def test_gate_test_set_keeps_only_test_images_the_champion_knew() -> None:
    """New test images (and relabelled ones) do not decide the gate."""
    champion = manifest([("x", "h1", "a", "test"), ("y", "h2", "b", "test"), ("z", "h3", "a", "train")])
    new = manifest(
        [("x", "h1", "a", "test"), ("y", "h2", "a", "test"), ("n", "h9", "b", "test"), ("z", "h3", "a", "train")]
    )
    assert list(gate_test_set(new, champion)["path"]) == ["x"]
    assert list(gate_test_set(new, None)["path"]) == ["x", "y", "n"]


def test_promotion_is_atomic_and_a_failed_one_leaves_the_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion link always names a complete version; a failure mid-copy changes nothing."""
    rp = RetrainParams(models_dir=str(tmp_path / "models"), keep_versions=2)
    src = tmp_path / "challenger"
    src.mkdir()
    (src / "model.pt").write_bytes(b"pt-1")
    (src / "model.onnx").write_bytes(b"onnx-1")
    m = manifest([("x", "h1", "a", "test")])
    first = promote(rp, src, src / "model.onnx", m, ["a"], {"kind": "head"})
    assert (tmp_path / "models/champion/model.onnx").read_bytes() == b"onnx-1"
    assert load_champion(rp)["version"] == first.name

    (src / "model.onnx").write_bytes(b"onnx-2")
    real_copy = shutil.copy2

    def failing_copy(a, b, *args, **kw):
        if str(b).endswith("model.pt"):
            raise OSError(28, "No space left on device")
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        promote(rp, src, src / "model.onnx", m, ["a"], {"kind": "head"})
    monkeypatch.undo()
    assert (tmp_path / "models/champion/model.onnx").read_bytes() == b"onnx-1"
    assert not [p for p in (tmp_path / "models/versions").iterdir() if p.name.startswith(".")]

    for _ in range(3):
        promote(rp, src, src / "model.onnx", m, ["a"], {"kind": "head"})
    assert (tmp_path / "models/champion/model.onnx").read_bytes() == b"onnx-2"
    assert len(list((tmp_path / "models/versions").iterdir())) == 2  # keep_versions


def _params_file(ws: Path, overrides: dict) -> Path:
    params = make_params(ws, overrides)
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump()))
    return path


RETRAIN_FAST = {
    "retrain": {"escalate_below_val_accuracy": None, "max_macro_f1_drop": 1.0, "max_class_recall_drop": 1.0}
}


def test_unchanged_data_is_a_recorded_no_op_and_a_new_class_needs_opting_in(ws: Path, prefect_harness) -> None:
    """Second run on the same data says so; an unseen class is refused unless allowed."""
    from graft.flows.retrain import retrain

    write_tree(ws / "raw", per_class=8)
    overrides = {
        **RETRAIN_FAST,
        "retrain": {
            **RETRAIN_FAST["retrain"],
            "models_dir": str(ws / "models"),
            "history": str(ws / "models/history.parquet"),
        },
    }
    path = _params_file(ws, overrides)
    assert retrain(str(path))["decision"] == "promoted"
    second = retrain(str(path))
    assert second["decision"] == "unchanged" and second["features_computed"] == 0

    write_tree(ws / "raw", classes=("cat", "dog", "bird"), per_class=8)
    with pytest.raises(GraftError, match=r"new class\(es\) \['bird'\].*allow_class_change"):
        retrain(str(path))
    overrides["retrain"]["allow_class_change"] = True
    path = _params_file(ws, overrides)
    third = retrain(str(path))
    assert third["decision"] == "promoted" and third["features_computed"] == 8
    assert json.loads((ws / "models/champion/classes.json").read_text())["classes"] == ["bird", "cat", "dog"]
    history = pd.read_parquet(ws / "models/history.parquet")
    assert list(history["decision"]) == ["promoted", "unchanged", "promoted"]


def test_a_weak_head_escalates_to_a_finetune(ws: Path, prefect_harness) -> None:
    """Below retrain.escalate_below_val_accuracy the flow fine-tunes and keeps the better challenger."""
    from graft.flows.retrain import retrain

    write_tree(ws / "raw", classes=("a", "b", "c", "d", "e"), per_class=8)  # a and e look alike: val acc < 1
    path = _params_file(
        ws,
        {
            "retrain": {
                "escalate_below_val_accuracy": 1.0,
                "escalation": "finetune_instead",
                "models_dir": str(ws / "models"),
                "history": str(ws / "models/history.parquet"),
            },
            "train": {"finetune": {"image_size": 32, "epochs": 1, "batch_size": 8, "workers": 1}},
        },
    )
    out = retrain(str(path))
    assert out["decision"] == "promoted" and out["kind"] == "finetune"
    assert json.loads((ws / "models/champion/meta.json").read_text())["kind"] == "finetune"
    assert (ws / "models/challenger/model.pt").is_file() and (ws / "models/challenger-finetune/model.pt").is_file()


def _write_digits(
    root: Path, images: np.ndarray, targets: np.ndarray, idx: list[int], shift: int = 0, tag: str = ""
) -> None:
    """Digits ``idx`` as PNGs under ``root/<label>/``; ``shift`` mislabels, ``tag`` re-encodes as new bytes."""
    for i in idx:
        pixels = (255 - np.clip(images[i] * 16, 0, 255)).astype(np.uint8)
        if tag:
            pixels[0, 0] ^= 1  # one grey level in a corner: the same picture, new bytes
        label = str((int(targets[i]) + shift) % 10)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(root / label / f"digit{tag}-{i:04d}.png")


@pytest.mark.slow
def test_a_week_of_arrivals_promotes_good_data_and_rejects_corrupted_labels(ws: Path, prefect_harness) -> None:
    """Real digits and Lite0: two good batches are promoted; a batch with shifted labels is rejected."""
    from sklearn.datasets import load_digits

    from graft.flows.retrain import retrain

    digits = load_digits()
    per_class = {c: [i for i in range(len(digits.target)) if digits.target[i] == c][:50] for c in range(10)}
    batches = [[i for c in per_class for i in per_class[c][a:b]] for a, b in ((0, 26), (26, 38), (38, 50))]
    path = _params_file(
        ws,
        {
            "featurize": {"backbone": "efficientnet_lite0", "batch_size": 32},
            # the gate judges the fp32 ONNX model; the int8 export (each day's calibration and quantization of
            # Lite0, slow on CPUs without VNNI) is the other retrain tests' and test_export's
            "export": {"quantize": None},
            "data": {"split": {"train": 0.6, "val": 0.1, "test": 0.3}},
            "retrain": {
                "escalate_below_val_accuracy": None,
                "max_macro_f1_drop": 0.05,
                "max_class_recall_drop": 0.5,
                "models_dir": str(ws / "models"),
                "history": str(ws / "models/history.parquet"),
            },
        },
    )
    decisions = []
    for day, batch in enumerate(batches):
        _write_digits(ws / "raw", digits.images, digits.target, batch)
        decisions.append(retrain(str(path)))
        assert decisions[-1]["features_computed"] == len(batch), f"day {day}"
    champion_before = (ws / "models/champion").resolve()
    everything = [i for b in batches for i in b]
    _write_digits(ws / "raw", digits.images, digits.target, everything, shift=1, tag="-relabelled")
    decisions.append(retrain(str(path)))

    assert [d["decision"] for d in decisions] == ["promoted", "promoted", "promoted", "rejected"]
    assert decisions[-1]["features_computed"] == len(everything)
    assert decisions[-1]["challenger_macro_f1"] < decisions[-1]["champion_macro_f1"] - 0.2
    assert (ws / "models/champion").resolve() == champion_before
    history = pd.read_parquet(ws / "models/history.parquet")
    assert list(history["decision"]) == ["promoted", "promoted", "promoted", "rejected"]
    assert list(history["features_computed"]) == [260, 120, 120, 500]
    assert history["challenger_macro_f1"].notna().all() and history["champion_macro_f1"].iloc[1:].notna().all()
