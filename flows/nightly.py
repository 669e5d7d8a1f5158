"""The `nightly` flow: whatever the sites dropped in the inbox → ingest → screen → audit, one run, one report.

Each step is the flow of the same name, run as a subflow, so a nightly run shows ingest, screen and audit with their
own tasks and artifacts under it. Every step is idempotent and cached on content: a shard already in the lake is not
ingested again, an image already scored by the promoted model is not scored again, and unchanged predictions are
not audited again. An empty inbox is a quick, successful no-op that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.audit import AuditReport, audit
from flows.ingest import IngestReport, ingest
from flows.screen import ScreenReport, screen
from tasks.ingest import inbox_root, list_inbox_task
from tasks.lake import Lake, lake_root


@dataclass
class NightlyReport:
    """What one nightly run did; `message` is the sentence a person reads first."""

    inbox: str
    lake: str
    message: str
    shards: list[str] = field(default_factory=list)
    ingest: IngestReport | None = None
    screen: ScreenReport | None = None
    audit: AuditReport | None = None

    @property
    def report(self) -> str | None:
        return self.audit.report if self.audit else None


@flow(name="nightly")
def nightly(
    inbox: str | None = None,
    lake: str | None = None,
    subsets: list[str] | None = None,
    target_sensitivity: float | None = None,
    engine: str = "auto",
) -> NightlyReport:
    """Ingest every shard in `inbox`, screen the lake with the promoted model, audit the labelled subsets and the
    night's batch for drift.

    inbox: the folder sites drop shards in (default $SCREENLINE_INBOX, else ./inbox; relative paths are from where
    the flow runs: the repository root for a deployment). The batch checked for drift is the shards this run
    landed, or, when none are new, every shard in the inbox. Ends Failed when the audit does (a subset below target),
    after the report is written; an audit that cannot show the target says "inconclusive" (or "not audited") in the
    message, never "passed". engine: as for `screen` (auto: TensorRT where this host can run it and the model has a
    TensorRT threshold). A shard that cannot be read at all is a reject row and the night goes on; one that fails
    after its retries (real I/O trouble) is left for the next run, the rest are screened and audited, and the run
    ends Failed naming it.
    """
    logger = get_run_logger()
    root = str(lake_root(lake))
    inbox = inbox_root(inbox)
    shards = list_inbox_task(inbox)
    if not shards:
        message = f"inbox {inbox} holds no shards: nothing to ingest, screen or audit"
        logger.info(message)
        create_markdown_artifact(key="nightly-summary", markdown=f"# Nightly\n\n{message}\n",
                                 description="nightly: empty inbox")
        return NightlyReport(inbox, root, message)

    landed = ingest(shards=shards, lake=root, fail_on_error=False)  # one bad shard must not cost the night
    new = [s.shard_id for s in landed.shards if s.landed_now]
    batch = new or [s.shard_id for s in landed.shards if s.status != "refused"]
    scored = screen(lake=root, engine=engine)
    audited = audit(lake=root, batch=batch, subsets=subsets, target_sensitivity=target_sensitivity)

    drift = audited.summary.drift
    message = (
        f"{len(shards)} shard(s) in the inbox, {len(new)} new: {landed.landed} image(s) landed, "
        f"{landed.rejected} rejected; {scored.scored} image(s) scored by {scored.version}, {scored.flagged} flagged; "
        f"audit {audited.verdict if audited.verdict != 'failed' else 'FAILED'}, "
        f"drift {'FLAGGED' if drift.get('flagged') else 'none'}"
    )
    create_markdown_artifact(
        key="nightly-summary",
        markdown=f"# Nightly\n\n{message}\n\nReport: `{audited.report}`\n\nPredictions: "
                 f"`{Lake.at(root).predictions_dir(scored.version)}/`\n",
        description="nightly: what landed, what was scored, the audit",
    )
    logger.info("%s; report %s", message, audited.report)
    if landed.failed:
        raise RuntimeError(f"{message}; but {len(landed.failed)} shard(s) failed after retries and were not ingested "
                           f"(the night screened and audited the rest; a re-run retries them): "
                           + "; ".join(landed.failed))
    return NightlyReport(inbox, root, message, shards, landed, scored, audited)
