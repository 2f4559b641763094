"""The Prefect flow chains the same stage functions and publishes metrics and report artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import make_params, write_tree

pytestmark = pytest.mark.prefect


def test_pipeline_flow_runs_every_stage_and_publishes_artifacts(ws: Path, prefect_harness) -> None:
    """One flow run produces the ONNX model and the metrics table and report artifacts."""
    from prefect.artifacts import Artifact

    from graft.flows.pipeline import pipeline

    write_tree(ws / "raw", classes=("red", "green", "blue"), per_class=10)
    params = make_params(ws)
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump()))

    summary = pipeline(str(path))

    assert summary["ingest"]["images"] == 30
    assert summary["featurize"]["computed"] == 30
    assert Path(params.export.out).is_file()
    metrics = json.loads((Path(params.evaluate.metrics_dir) / "evaluation.json").read_text())
    table = Artifact.get("graft-metrics")
    assert table is not None and table.type == "table"
    rows = json.loads(table.data)
    assert [r["model"] for r in rows] == [metrics["model_name"], "raw-pixel baseline"]
    assert rows[0]["accuracy"] == metrics["model"]["accuracy"]
    assert summary["verdict"] == metrics["vs_baseline"]["sentence"]  # the log ends with short lines, not a dict
    board = Artifact.get("graft-leaderboard")  # the train stage's candidates (head mode: its one row)
    assert board is not None and board.type == "table"
    csv_rows = pd.read_csv(Path(params.evaluate.metrics_dir) / "leaderboard.csv").to_dict("records")
    shown = [(r["candidate"], r["score"]) for r in json.loads(board.data)]
    assert shown == [(r["candidate"], None if pd.isna(r["score"]) else r["score"]) for r in csv_rows]  # NaN: no JSON
    report = Artifact.get("graft-report")
    assert report is not None and report.type == "markdown" and "raw pixels" in report.data


def test_second_flow_run_uses_the_cache(ws: Path, prefect_harness) -> None:
    """A rerun of the flow on unchanged data computes no features."""
    from graft.flows.pipeline import pipeline

    write_tree(ws / "raw", per_class=8)
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(make_params(ws).model_dump()))
    assert pipeline(str(path))["featurize"]["computed"] == 16
    assert pipeline(str(path))["featurize"]["computed"] == 0
