"""The `ingest` flow: shard files → validated rows in lake/images/, refusals in lake/rejects/."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_table_artifact

from flows.progress import gather_with_progress
from tasks.housekeeping import sweep_stale_temps_task
from tasks.ingest import (IngestOptions, ShardSummary, find_shards_task, fingerprint_task, ingest_shard_task,
                          lake_channels_task)
from tasks.lake import lake_root


@dataclass
class IngestReport:
    """What one ingest run did: where the lake is, and a summary per shard."""

    lake: str
    channels: int
    shards: list[ShardSummary] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        """Images of these shards in the lake, landed now or by an earlier run."""
        return sum(s.accepted for s in self.shards)

    @property
    def landed(self) -> int:
        """Images this run added to the lake."""
        return sum(s.accepted for s in self.shards if s.landed_now)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.shards)


@flow(name="ingest")
def ingest(
    shards: list[str],
    lake: str | None = None,
    channels: int | None = None,
    resize: bool = False,
    subset: str | None = None,
    test_subset: str | None = None,
    replace: list[str] | None = None,
    fail_on_error: bool = True,
) -> IngestReport:
    """Ingest shards (paths or globs: folders of PNG/JPEG, MedMNIST .npz, WebDataset .tar) into the lake.

    channels: the lake's channel count, fixed by its first ingest (default: from the first shard's images).
    resize: resize images that are not 64×64 instead of refusing them (recorded in the `resized` column).
    subset: mark every image of these shards as belonging to a labelled audit subset of that name.
    test_subset: land the test split of MedMNIST-layout .npz shards (test_images/test_labels) as the labelled audit
    subset of this name, so a public benchmark's own test split audits what optimize trains on the rest.
    replace: shard ids these shards replace, whatever their path (a corrected delivery from the same path replaces
    the earlier one without it when it holds every image that one held; tasks/ingest.py).
    fail_on_error: end Failed when a shard failed after its retries (the others landed either way); nightly passes
    False, screens and audits what landed, and fails at the end naming them.
    """
    logger = get_run_logger()
    root = str(lake_root(lake))
    sweep_stale_temps_task(root)
    paths = find_shards_task(shards)
    refs = fingerprint_task.map(paths)
    options = IngestOptions(lake_channels_task(root, refs, channels), resize, subset, test_subset,
                            tuple(sorted(replace or ())))
    logger.info("ingesting %d shard(s) into %s (%d channel(s))", len(paths), root, options.channels)

    futures = ingest_shard_task.map(refs, lake_root=unmapped(root), options=unmapped(options))
    landed, failed = gather_with_progress(futures, paths, "ingest-progress", "shards landed")
    report = IngestReport(root, options.channels, sorted(landed, key=lambda s: s.shard), failed)

    create_table_artifact(
        key="ingest-summary",
        table=[
            {"shard": s.shard, "shard_id": s.shard_id, "status": s.status, "accepted": s.accepted,
             "rejected": s.rejected, "reasons": ", ".join(f"{k}={v}" for k, v in sorted(s.reasons.items()))}
            for s in report.shards
        ],
        description=f"Ingest into {root}: {report.accepted} accepted, {report.rejected} rejected",
    )
    if report.failed and fail_on_error:
        raise RuntimeError(
            f"{len(report.failed)} shard(s) failed after retries (the others landed; re-run to retry them): "
            + "; ".join(report.failed)
        )
    return report
