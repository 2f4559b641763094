"""Stage logic. Each module holds plain typed functions and wraps its entry point as a Prefect task.

Stage modules never import each other (nor ``graft.flows``): what two stages share lives in a library
module under ``graft/``, so each ``dvc.yaml`` stage can list exactly the code it runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from graft.sources import is_transient

if TYPE_CHECKING:
    from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only I/O errors that may pass (:func:`graft.sources.is_transient`)."""
    return is_transient(state.result(raise_on_failure=False))


class StageTask(Generic[P, R]):
    """A stage function's Prefect task, built on first use: importing a stage module (``graft featurize`` on a
    warm cache, ``dvc repro`` of one stage) does not pay for importing Prefect. Calls and attributes
    (``submit``, ``with_options``, ``name``...) go to the task."""

    def __init__(self, fn: Callable[P, R], name: str) -> None:
        self.fn, self.name = fn, name

    @functools.cached_property
    def task(self) -> Task[P, R]:
        from prefect import task

        return task(name=self.name, retries=2, retry_delay_seconds=[2.0, 10.0], retry_condition_fn=retry_transient)(
            self.fn
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.task(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.task, attr)


def stage_task(fn: Callable[P, R], name: str) -> StageTask[P, R]:
    """Wrap a stage function as a Prefect task with backoff retries for transient I/O errors."""
    return StageTask(fn, name)
