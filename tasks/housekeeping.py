"""Housekeeping at the start of a run: what a killed run left behind is removed, what a live one is writing never is.

Every write goes through a temp file named for its writer (screenline/files.py); a kill -9 or a power cut leaves
that file behind. The next flow run on the lake removes the ones whose writer on this host is gone.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from screenline.files import remove_stale_temps
from tasks.caching import IO_RETRIES
from tasks.lake import Lake


def sweep_stale_temps(lake: Lake) -> list[str]:
    """Remove the temp files under the lake whose writer is gone; returns their paths."""
    return [str(p) for p in remove_stale_temps(lake.root)] if lake.root.is_dir() else []


@task(name="sweep-stale-temps", **IO_RETRIES)
def sweep_stale_temps_task(lake_root: str) -> int:
    """Remove what killed runs left in the lake (see `sweep_stale_temps`); returns how many files."""
    removed = sweep_stale_temps(Lake.at(lake_root))
    if removed:
        get_run_logger().info("removed %d temp file(s) that killed runs left behind, e.g. %s", len(removed),
                              removed[0])
    return len(removed)
