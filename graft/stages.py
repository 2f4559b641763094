"""Run a pipeline stage by name: the one dispatcher behind ``graft <stage>``, ``dvc repro`` and the flows.

It picks the code a stage runs from the params (the train mode, the featurize runner), holds the
shared feature cache's lock around featurize, and calls either the plain function (CLI, DVC) or its
Prefect task (inside a flow, for retries and the UI). :data:`STAGE_MODULES` says which modules each
stage can run; ``tests/test_layout.py`` checks that ``dvc.yaml`` lists them and everything they import.
"""

from __future__ import annotations

import contextlib
from importlib import import_module
from typing import Any

from graft.params import Params
from graft.startup import loading

STAGES = ("ingest", "featurize", "train", "evaluate", "export")

# (module, function) per stage variant; the Prefect task of a function ``f`` is ``f_task`` beside it.
_ENTRY = {
    "ingest": ("graft.tasks.ingest", "ingest"),
    "featurize/local": ("graft.tasks.featurize", "featurize"),
    "featurize/dask": ("graft.flows.scale", "featurize_dask"),  # a flow of shard tasks: never wrapped again
    "train/head": ("graft.tasks.train_head", "train"),
    "train/finetune": ("graft.tasks.finetune", "finetune"),
    "train/auto": ("graft.tasks.auto", "auto"),
    "evaluate": ("graft.tasks.evaluate", "evaluate"),
    "export": ("graft.tasks.export", "export"),
}

# Every module a stage may run, whatever the params say (the DVC stage must rerun when any changes).
STAGE_MODULES: dict[str, list[str]] = {
    stage: sorted(
        {module for key, (module, _) in _ENTRY.items() if key.split("/")[0] == stage}
        | ({"graft.tasks.shard"} if stage == "featurize" else set())
    )
    for stage in STAGES
}


def variant(name: str, params: Params) -> str:
    """The entry of ``_ENTRY`` that stage ``name`` runs with these params."""
    if name == "train":
        return f"train/{params.train.mode}"
    if name == "featurize":
        return f"featurize/{params.featurize.runner}"
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}")
    return name


def run_stage(name: str, params: Params, *, as_task: bool = False, **kwargs: Any) -> dict:
    """Run stage ``name`` and return its summary.

    Args:
        name: one of :data:`STAGES`.
        params: the run's params; they choose the train mode and the featurize runner.
        as_task: call the Prefect task (inside a flow) instead of the plain function.
        **kwargs: passed to the stage function (e.g. ``resume`` for fine-tuning).
    """
    key = variant(name, params)
    module_name, fn_name = _ENTRY[key]
    with loading():  # torch, pandas, scikit-learn: no garbage to collect while they load
        module = import_module(module_name)
    wrapped = as_task and key != "featurize/dask"
    fn = getattr(module, f"{fn_name}_task" if wrapped else fn_name)
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if name == "featurize":  # the cache is shared across workspaces: queue behind another featurize of it
        from graft.lock import cache_lock

        lock = cache_lock(params.featurize.cache_dir)
    with lock:
        return dict(fn(params, **kwargs))
