"""The DVC side of a run: metrics.json holds the headline figures only, every chart is declared once with
axis titles, `dvc plots show`'s folder is ignored, and a rerun of the stages rewrites every DVC-tracked
output byte for byte (so `graft run` after `dvc repro` leaves `dvc status` clean)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from graft.plots import best_epoch, plot_curves
from graft.tasks.auto import auto
from graft.tasks.evaluate import evaluate
from graft.tasks.export import export
from graft.tasks.featurize import featurize
from graft.tasks.ingest import ingest
from tests.helpers import REPO, make_params, run_stages, write_tree

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def _declared(kind: str) -> list[str]:
    """Every path a stage declares under ``kind`` (outs, metrics or plots)."""
    return [next(iter(e)) if isinstance(e, dict) else e for st in DVC["stages"].values() for e in st.get(kind, [])]


def test_the_one_dvc_metrics_file_is_metrics_json() -> None:
    assert _declared("metrics") == ["metrics/metrics.json"]


def test_every_chart_is_declared_once_with_axis_titles() -> None:
    assert _declared("plots") == []  # stage-level plots would draw the same CSVs a second time
    charts = [next(iter(p.items())) for p in DVC["plots"]]
    sources = [(f, tuple(y) if isinstance(y, list) else (y,)) for _, c in charts for f, y in c["y"].items()]
    assert len(sources) == len(set(sources))
    for name, chart in charts:
        assert chart.get("x_label") and chart.get("y_label") and chart.get("title"), name
    outs = set(_declared("outs"))
    assert {f for f, _ in sources} <= outs  # the data files are stage outputs, drawn only here


def test_dvc_plots_folder_is_ignored() -> None:
    assert "/dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()


def test_best_epoch_is_the_lowest_val_loss_else_the_best_val_accuracy() -> None:
    frame = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "val_loss": [0.9, 0.4, 0.5, 0.45], "val_accuracy": [0.5, 0.8, 0.9, 0.85]}
    )
    assert best_epoch(frame) == 2
    assert best_epoch(frame.assign(val_loss=math.nan)) == 3
    assert best_epoch(frame.assign(val_loss=math.nan, val_accuracy=math.nan)) is None


def test_training_writes_the_curves_csv_without_matplotlib_and_evaluate_draws_it(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": abs(e - 3) + 0.1, "train_accuracy": 0.1 * e, "val_accuracy": 0.5}
        for e in range(1, 7)
    ]
    code = (
        "import json, sys; from graft.plots import write_curves; "
        f"write_curves(json.loads({json.dumps(json.dumps(history))}), {str(tmp_path / 'm')!r}); "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "False"  # the training stages never pay for importing matplotlib
    curves = pd.read_csv(tmp_path / "m/curves.csv")
    assert list(curves["epoch"]) == list(range(1, 7))
    assert list(curves["best"]) == [0, 0, 1, 0, 0, 0]  # val loss is lowest at epoch 3: the DVC charts mark it
    assert not (tmp_path / "p").exists()
    plot_curves(tmp_path / "m/curves.csv", tmp_path / "p/curves.png")
    assert (tmp_path / "p/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "m/curves.csv").unlink()
    plot_curves(tmp_path / "m/curves.csv", tmp_path / "p/curves.png")  # no curves (yet): no stale picture either
    assert not (tmp_path / "p/curves.png").exists()


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.mark.usefixtures("one_torch_thread")
def test_metrics_are_the_headline_and_a_rerun_rewrites_every_tracked_output_identically(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    write_tree(tmp_path / "raw", ("red", "green", "blue"), per_class=10)
    params = make_params(
        tmp_path,
        {"train": {"mode": "auto", "candidates": ["pixels", "logreg"]}, "featurize": {"taps": ["raw", "last"]}},
    )
    run_stages(params, ingest, featurize, auto, evaluate, export)
    m, p = tmp_path / "metrics", tmp_path / "plots"
    tracked = [
        *(m / f for f in ("metrics.json", "evaluation.json", "train.json", "leaderboard.csv", "curves.csv")),
        *(m / f for f in ("confusion.csv", "export.json")),
        p / "curves.png",
        p / "confusion.png",
        tmp_path / "reports/report.md",
        tmp_path / "models/model.pt",
        tmp_path / "models/model.onnx",
    ]
    first = _digest(tracked)

    headline = json.loads((m / "metrics.json").read_text())
    scores = {"accuracy", "macro_f1", "balanced_accuracy", "ece", "n"}
    assert set(headline) == scores | {"baseline", "vs_baseline", "chosen", "chosen_heldout_f1"}
    assert set(headline["baseline"]) == scores
    assert set(headline["vs_baseline"]) == {"f1_diff", "ci_low", "ci_high", "verdict"}
    assert headline["chosen"] in ("pixels", "logreg") and 0 <= headline["chosen_heldout_f1"] <= 1
    flat = [v for v in headline.values() if not isinstance(v, dict)]
    flat += [v for section in ("baseline", "vs_baseline") for v in headline[section].values()]
    strings = sorted(v for v in flat if isinstance(v, str))
    assert strings == sorted([headline["vs_baseline"]["verdict"], headline["chosen"]])  # no paths, no sentences
    assert headline["vs_baseline"]["verdict"] in ("wins", "ties", "loses")
    details = json.loads((m / "evaluation.json").read_text())
    assert set(details["model"]["per_class"]) == {"red", "green", "blue"}
    assert details["model"]["accuracy"] == headline["accuracy"]
    assert "seconds" not in json.loads((m / "train.json").read_text())
    timings = pd.read_csv(m / "leaderboard_timings.csv")  # the wall-clock figures live here, untracked
    assert set(timings["candidate"]) == {"pixels", "logreg"} and (timings["train_seconds"] >= 0).all()

    run_stages(params, ingest, featurize, auto, evaluate, export)
    assert _digest(tracked) == first


def test_the_curves_template_draws_a_rule_at_the_best_epoch() -> None:
    """The loss and accuracy charts use the local template whose second layer is a rule where best == 1."""
    template = json.loads((REPO / ".dvc/plots/curves_best_epoch.json").read_text())
    line, rule = template["layer"]
    assert rule["mark"]["type"] == "rule" and "datum.best" in rule["transform"][0]["filter"]
    assert line["encoding"]["y"]["field"] == "<DVC_METRIC_Y>" and template["data"]["values"] == "<DVC_METRIC_DATA>"
    charts = {k: v for p in DVC["plots"] for k, v in p.items()}
    assert charts["loss"]["template"] == charts["accuracy"]["template"] == "curves_best_epoch"
