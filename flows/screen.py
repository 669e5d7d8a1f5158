"""The `screen` flow: score every lake shard with the promoted model at this host's knee, predictions as Parquet."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.progress import gather_with_progress
from models.engine import default_threads
from tasks.housekeeping import sweep_stale_temps_task
from tasks.lake import lake_root
from tasks.screen import (
    ShardScreenSummary,
    list_shards_task,
    resolve_model_task,
    screen_shard_task,
    sweep_orphans_task,
    triage_task,
)


@dataclass
class ScreenReport:
    """What one screen run did."""

    lake: str
    version: str
    batch: int
    shards: list[ShardScreenSummary] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gate: str = "passed"
    superseded: int = 0  # predictions files of shards no longer in the lake, moved aside

    @property
    def scored(self) -> int:
        return sum(s.images for s in self.shards if s.status == "scored")

    @property
    def redecided(self) -> int:
        """Images whose scores were decided again at a threshold that changed."""
        return sum(s.images for s in self.shards if s.status == "redecided")

    @property
    def flagged(self) -> int:
        return sum(s.flagged for s in self.shards if s.status in ("scored", "redecided"))


@flow(name="screen", task_runner=ThreadPoolTaskRunner(max_workers=default_threads()))
def screen(lake: str | None = None, version: str | None = None, workers: int | None = None,
           engine: str = "auto", allow_failed_gate: bool = False) -> ScreenReport:
    """Score every image in the lake with the promoted model (or `version`), a task per shard.

    engine: auto (TensorRT where this host has a GPU and the version a TensorRT threshold, else the fastest CPU
    engine the version ships that this host runs: OpenVINO or ONNX Runtime), onnxruntime, openvino, or tensorrt
    (fails at once, saying what is missing, where it cannot run).
    workers: shard tasks running at once (default: one per core), at most the task runner's threads (one per core
    as deployed; `screen_on(workers)` runs it on that many); each engine call then uses cores // workers threads,
    so the cores are busy and not oversubscribed. Shards whose predictions by this version are current are
    skipped; stale ones are scored or decided again (tasks/predictions.py).
    allow_failed_gate: screen with a version whose held-out gate failed (refused otherwise); recorded with every
    prediction it makes.
    """
    logger = get_run_logger()
    root = str(lake_root(lake))
    sweep_stale_temps_task(root)
    shards = list_shards_task(root)
    # Fewer shards than workers: give each engine call the spare cores instead of leaving them idle.
    workers = max(1, min(workers or default_threads(), len(shards)))
    model = resolve_model_task(root, version, workers, engine, allow_failed_gate, _callers(workers))
    if model.gate != "passed":
        logger.warning("screening with %s although it %s (--allow-failed-gate)", model.version, model.gate)
    superseded = sweep_orphans_task(root)
    pending, current = triage_task(model, shards)
    if 0 < len(pending) < workers:  # the work is fewer shards than workers: the spare cores go to each engine call
        model = dataclasses.replace(model, threads=max(1, default_threads() // len(pending)),
                                    callers=min(model.callers, len(pending)))
    logger.info("screening %d of %d shard(s) with %s (%s %s, threshold %.4f, batch %d, %d thread(s) per engine "
                "call, %d call(s) at once an engine); %d already current", len(pending), len(shards), model.version,
                model.engine, model.precision, model.threshold, model.batch, model.threads, model.callers,
                len(current))
    report = ScreenReport(root, model.version, model.batch, gate=model.gate, superseded=superseded)
    report.shards = list(current)
    if not pending:
        return report
    t0 = time.perf_counter()
    ids = [s for s, _ in pending]
    futures = screen_shard_task.map(ids, [h for _, h in pending], model=unmapped(model),
                                    run_id=unmapped(str(flow_run.id)))
    done, report.failed = gather_with_progress(futures, ids, "screen-progress", "shards scored")
    report.shards += done
    report.seconds = time.perf_counter() - t0
    create_table_artifact(
        key="screen-summary",
        table=[{"model": model.version, "gate": model.gate, "shards": len(report.shards),
                "images scored": report.scored, "images re-decided": report.redecided,
                "flagged positive": report.flagged, "seconds": round(report.seconds, 2),
                "images/s": round(report.scored / report.seconds) if report.seconds else 0,
                "failed shards": len(report.failed)}],
        description=f"screen of {root} with {model.version}",
    )
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} shard(s) failed (the others were scored): "
                           + "; ".join(report.failed))
    return report


def _callers(workers: int) -> int:
    """Shard tasks that call one process's engine at once: all of them on this flow run's threads, one on a Dask
    worker (a process each, one thread)."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return workers if runner is None or isinstance(runner, ThreadPoolTaskRunner) else 1


def screen_on(workers: int | None = None, dask: str | None = None) -> Any:
    """The screen flow with `workers` shard tasks at once: on that many threads (default one per core), or on a
    Dask cluster through prefect-dask (extra `dask`): `local` (a LocalCluster of `workers` processes) or a
    scheduler's address. ImportError, saying what to install, without the extra."""
    if not dask:
        return screen.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers or default_threads()))
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ImportError("--dask needs the `dask` extra: pip install -e '.[dask]'") from None
    if dask == "local":
        return screen.with_options(task_runner=DaskTaskRunner(cluster_kwargs={
            "n_workers": workers or default_threads(), "threads_per_worker": 1, "processes": True,
            "dashboard_address": None}))
    return screen.with_options(task_runner=DaskTaskRunner(address=dask))
