"""The feature-transfer pipeline as one Prefect flow: ingest -> featurize -> train -> evaluate -> export."""

from __future__ import annotations

from typing import Optional

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from graft.lock import cache_lock, workspace_lock
from graft.params import load_params
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.featurize import featurize_task
from tasks.finetune import finetune_task
from tasks.ingest import ingest_task
from tasks.train_head import train_task


def metrics_rows(metrics: dict) -> list[dict]:
    """The model and baseline rows of the evaluation, for a Prefect table artifact."""
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "ece", "n")
    return [{"model": name, **{k: metrics[part][k] for k in keys}}
            for name, part in ((metrics["model_name"], "model"), ("raw-pixel baseline", "baseline"))]


@flow(name="graft-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", wait_s: Optional[float] = None) -> dict:
    """Run every stage in order on ``params_path`` and publish the metrics and the report.

    Holds the workspace lock throughout, so an overlapping scheduled run is refused (or, with
    ``wait_s`` / ``GRAFT_LOCK_WAIT``, queues) instead of rewriting this run's outputs.
    """
    with workspace_lock(params_path, wait_s):
        return _run_stages(params_path)


def _run_stages(params_path: str) -> dict:
    """The stages in order, with featurize holding the shared cache's lock; returns their summaries."""
    params = load_params(params_path)
    summary = {"ingest": ingest_task(params)}
    with cache_lock(params.featurize.cache_dir):  # the cache is shared with other workspaces
        summary["featurize"] = featurize_task(params)
    summary["train"] = (finetune_task if params.train.mode == "finetune" else train_task)(params)
    metrics = evaluate_task(params)
    summary["export"] = export_task(params)
    create_table_artifact(metrics_rows(metrics), key="graft-metrics", description="test metrics vs raw-pixel baseline")
    with open(params.evaluate.report, encoding="utf-8") as fh:
        create_markdown_artifact(fh.read(), key="graft-report", description="evaluation report")
    summary["metrics"] = metrics_rows(metrics)
    print(summary)
    return summary


if __name__ == "__main__":
    pipeline()
