"""The retrain report shows every challenger considered, validation and test side by side, and why one won."""

from __future__ import annotations

from pathlib import Path

from graft.flows.retrain import auto_rows, challenger_rows
from graft.tasks.retrain import DataDiff, comparison_markdown
from tests.helpers import make_params

ROW = {"decision": "promoted", "reason": "macro-F1 0.9 vs champion 0.8", "gate_test_images": 40}


def _metrics(name: str, acc: float, f1: float) -> dict:
    return {"model_name": name, "model": {"accuracy": acc, "macro_f1": f1, "balanced_accuracy": acc}}


def _diff() -> DataDiff:
    return DataDiff(added=5)


def test_head_and_finetune_challengers_side_by_side(tmp_path: Path) -> None:
    head = make_params(tmp_path)
    ft = head.model_copy(update={"train": head.train.model_copy(update={"mode": "finetune"})})
    rows = challenger_rows(
        [
            (head, {"val_accuracy": 0.81}, _metrics("tiny_cnn + logreg head", 0.80, 0.79)),
            (ft, {"val_accuracy": 0.93}, _metrics("tiny_cnn fine-tuned at 64 px", 0.91, 0.90)),
        ],
        ft,
        "head val accuracy 0.8100 < retrain.escalate_below_val_accuracy: fine-tuned too",
    )
    md = comparison_markdown(ROW, _diff(), _metrics("x", 0.91, 0.9)["model"], None, rows)
    table = md[md.index("## Challengers") :]
    assert "| logreg head | accuracy 0.8100 | 0.8000 | 0.7900 |  |" in table
    assert "| fine-tune | accuracy 0.9300 | 0.9100 | 0.9000 | **yes** |" in table
    assert "Why: head val accuracy 0.8100 < retrain.escalate_below_val_accuracy: fine-tuned too." in table


def test_auto_challengers_come_from_its_leaderboard(tmp_path: Path) -> None:
    params = make_params(tmp_path)
    board = Path(params.evaluate.metrics_dir) / "leaderboard.csv"
    board.parent.mkdir(parents=True)
    board.write_text(
        "candidate,score,se,scored_on,settings,onnx_bytes,chosen,note\n"
        'logreg,0.9,0.02,val split (n=40),"{}",100,True,\n'
        'finetune,0.88,0.03,val split (n=40),"{}",900,False,\n'
        "other_backbones,,,,,,False,skipped: no local weights\n"
    )
    rows = auto_rows(params, _metrics("tiny_cnn + logreg head", 0.87, 0.86))
    assert [r["challenger"] for r in rows] == ["logreg", "finetune", "other_backbones"]
    assert [r["chosen"] for r in rows] == [True, False, False]
    md = comparison_markdown(ROW, _diff(), _metrics("x", 0.87, 0.86)["model"], None, rows)
    assert "| logreg | macro-F1 0.9000 (val split (n=40)) | 0.8700 | 0.8600 | **yes** |" in md
    assert "| finetune | macro-F1 0.8800 (val split (n=40)) |  |  |  |" in md
    assert "| other_backbones | skipped: no local weights |  |  |  |" in md
    assert "Why: train.mode: auto: the best held-out macro-F1 within one standard error" in md


def test_report_without_challengers_is_unchanged() -> None:
    md = comparison_markdown({**ROW, "decision": "unchanged"}, _diff(), None, None)
    assert "## Challengers" not in md
