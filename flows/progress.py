"""Waiting on a flow's mapped shard tasks while a Prefect progress artifact follows them."""

from __future__ import annotations

from typing import Any, Sequence

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFutureList, as_completed


def gather_with_progress(
    futures: PrefectFutureList, names: Sequence[str], key: str, description: str
) -> tuple[list[Any], list[str]]:
    """Results of the tasks that completed, and "name: error" for the ones that failed after their retries.

    A failed task does not stop the others: the caller decides what a failure means for the run.
    """
    progress = create_progress_artifact(0.0, key=key, description=description)
    done: list[Any] = []
    failed: list[str] = []
    for count, future in enumerate(as_completed(futures), start=1):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            failed.append(f"{names[futures.index(future)]}: {outcome}")
        else:
            done.append(outcome)
        update_progress_artifact(progress, 100.0 * count / len(futures))
    return done, failed
