"""Stage logic. Each module holds plain typed functions and wraps its entry point as a Prefect task.

Stage modules never import each other (nor ``graft.flows``): what two stages share lives in a library
module under ``graft/``, so each ``dvc.yaml`` stage can list exactly the code it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from graft.sources import is_transient

if TYPE_CHECKING:
    from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only I/O errors that may pass (:func:`graft.sources.is_transient`)."""
    return is_transient(state.result(raise_on_failure=False))


def stage_task(fn: Callable[P, R], name: str) -> Task[P, R]:
    """Wrap a stage function as a Prefect task with backoff retries for transient I/O errors."""
    from prefect import task

    return task(name=name, retries=2, retry_delay_seconds=[2.0, 10.0], retry_condition_fn=retry_transient)(fn)
