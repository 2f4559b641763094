"""Stage logic. Each module holds plain typed functions and wraps its entry point as a Prefect task."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from graft import GraftError

F = TypeVar("F", bound=Callable[..., Any])


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only I/O errors that may pass (not bad inputs or bad params, which fail the same way again)."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, GraftError)


def stage_task(fn: F, name: str) -> F:
    """Wrap a stage function as a Prefect task with backoff retries for transient I/O errors."""
    from prefect import task

    return task(fn, name=name, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)  # type: ignore[return-value]
