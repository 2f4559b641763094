"""The feature-transfer pipeline as one Prefect flow: ingest -> featurize -> train -> evaluate -> export."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

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
def pipeline(params_path: str = "params.yaml") -> dict:
    """Run every stage in order on ``params_path`` and publish the metrics and the report."""
    params = load_params(params_path)
    summary = {"ingest": ingest_task(params)}
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
