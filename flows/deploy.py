"""Serve the pipeline and the retrain flow as scheduled Prefect deployments.

    prefect server start                      # in another terminal (or set PREFECT_API_URL)
    python -m graft.flows.deploy --params params.yaml

Both deployments run on the cron in ``retrain.schedule``. Each has a deployment concurrency limit of
one with the ENQUEUE strategy, so a run scheduled while the previous one is still going waits for it;
the workspace lock (graft/lock.py) also guards against runs started any other way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from graft.flows.pipeline import pipeline
from graft.flows.retrain import retrain
from graft.params import load_params

ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployments(params_path: str, cron: str | None = None) -> list:
    """The two deployments, with the params file's absolute path baked into their parameters."""
    path = str(Path(params_path).resolve())
    schedule = cron or load_params(path).retrain.schedule
    common: dict[str, Any] = {"cron": schedule, "parameters": {"params_path": path}, "concurrency_limit": ONE_AT_A_TIME}
    return [
        pipeline.to_deployment(
            name="graft-pipeline", description="ingest -> featurize -> train -> evaluate -> export", **common
        ),
        retrain.to_deployment(name="graft-retrain", description="challenger vs champion on new data", **common),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="the params file the deployments run with")
    ap.add_argument("--cron", help="a cron schedule for both deployments (default: retrain.schedule in the params)")
    args = ap.parse_args(argv)
    serve(*deployments(args.params, args.cron))


if __name__ == "__main__":
    main()
