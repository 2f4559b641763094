"""The feature-transfer pipeline as one Prefect flow: ingest -> featurize -> train -> evaluate -> export."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from graft.console import flow_lines
from graft.lock import workspace_lock
from graft.params import load_params
from graft.stages import STAGES, run_stage


def metrics_rows(metrics: dict) -> list[dict]:
    """The model and baseline rows of the evaluation, for a Prefect table artifact."""
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "ece", "n")
    return [
        {"model": name, **{k: metrics[part][k] for k in keys}}
        for name, part in ((metrics["model_name"], "model"), ("raw-pixel baseline", "baseline"))
    ]


@flow(name="graft-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", wait_s: float | None = None) -> dict:
    """Run every stage in order on ``params_path`` and publish the metrics and the report.

    Holds the workspace lock throughout, so an overlapping scheduled run is refused (or, with
    ``wait_s`` / ``GRAFT_LOCK_WAIT``, queues) instead of rewriting this run's outputs.
    """
    with workspace_lock(params_path, wait_s):
        return _run_stages(params_path)


def _run_stages(params_path: str) -> dict:
    """The stages in order (:func:`graft.stages.run_stage` takes the cache lock); returns their summaries."""
    params = load_params(params_path)
    summary: dict = {name: run_stage(name, params, as_task=True) for name in STAGES}
    metrics = summary.pop("evaluate")  # the full metrics go to the artifacts below, not the summary
    create_table_artifact(metrics_rows(metrics), key="graft-metrics", description="test metrics vs raw-pixel baseline")
    board = Path(params.evaluate.metrics_dir) / "leaderboard.csv"
    if board.is_file():  # every candidate the train stage considered, with its held-out score
        rows = pd.read_csv(board).astype(object).where(lambda f: f.notna(), None).to_dict("records")
        create_table_artifact(rows, key="graft-leaderboard", description="train candidates (held-out macro-F1)")
    with open(params.evaluate.report, encoding="utf-8") as fh:
        create_markdown_artifact(fh.read(), key="graft-report", description="evaluation report")
    summary["metrics"] = metrics_rows(metrics)
    summary["verdict"] = metrics["vs_baseline"]["sentence"]
    # a few short lines in the flow log (the full figures are in metrics/ and the artifacts above)
    print("\n".join([*flow_lines(summary), summary["verdict"]]))
    return summary


if __name__ == "__main__":
    pipeline()
