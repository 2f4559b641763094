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

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from graft.flows.pipeline import pipeline
from graft.flows.retrain import retrain
from graft.params import load_params

ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployments(params_path: str, cron: str | None = None) -> list[RunnerDeployment]:
    """The two deployments, with the params file's absolute path baked into their parameters."""
    path = str(Path(params_path).resolve())
    schedule = cron or load_params(path).retrain.schedule
    flows = (
        (pipeline, "graft-pipeline", "ingest -> featurize -> train -> evaluate -> export"),
        (retrain, "graft-retrain", "challenger vs champion on new data"),
    )
    out = []
    for f, name, description in flows:
        d = f.to_deployment(
            name=name,
            description=description,
            cron=schedule,
            parameters={"params_path": path},
            concurrency_limit=ONE_AT_A_TIME,
        )
        # Prefect types it "object or coroutine"; called outside an event loop it is always the object.
        assert isinstance(d, RunnerDeployment)
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="the params file the deployments run with")
    ap.add_argument("--cron", help="a cron schedule for both deployments (default: retrain.schedule in the params)")
    args = ap.parse_args(argv)
    serve(*deployments(args.params, args.cron))


if __name__ == "__main__":
    main()
