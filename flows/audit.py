"""The `audit` flow: sensitivity on the lake's labelled subsets, with intervals, subgroups, drift and a report."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from tasks.audit import (
    AuditFailed,
    AuditSummary,
    audit_drift_task,
    audit_figures_task,
    audit_markdown,
    audit_report_task,
    drift_artifact,
    figures_artifact,
    plan_audit_task,
    verdict_sentence,
)
from tasks.housekeeping import sweep_stale_temps_task
from tasks.lake import lake_root


@dataclass
class AuditReport:
    """Where an audit's figures and report are, and what it found."""

    summary: AuditSummary
    report: str

    @property
    def verdict(self) -> str:
        """passed | failed | inconclusive | not audited (tasks.audit.AuditSummary.verdict)."""
        return self.summary.verdict

    @property
    def passed(self) -> bool:
        """Every subset's positives support the target: never true for an audit that could not show it."""
        return self.verdict == "passed"


@flow(name="audit")
def audit(
    lake: str | None = None,
    version: str | None = None,
    subsets: list[str] | None = None,
    batch: list[str] | None = None,
    threshold: float | None = None,
    target_sensitivity: float | None = None,
    one_sided: bool = False,
) -> AuditReport:
    """Audit a model's predictions against the labels of the lake's labelled subsets, and check drift.

    version: default the promoted model. subsets: default every labelled subset. batch: shard ids whose scores are
    compared with the reference for drift (default: the shards of the newest screen run). threshold: default the
    shipped one (set it to see what another threshold would do). target_sensitivity: default the model's gate.
    one_sided: a subset's claim rests on the one-sided exact 95% lower bound (149 positives without a miss show 98%)
    instead of the lower end of the two-sided exact 95% interval, a one-sided 97.5% bound (183 positives).
    Ends Failed, after writing the figures and the report, when a subset's sensitivity is below target. Completes
    with verdict "inconclusive" when no subset is below target but one cannot show it (no positives, or too few for
    the exact lower bound to reach the target), and "not audited" when the lake has no labelled subset: neither
    reads as a pass.
    """
    logger = get_run_logger()
    root = str(lake_root(lake))
    sweep_stale_temps_task(root)
    plan = plan_audit_task(root, version, subsets, batch, threshold, target_sensitivity, "one" if one_sided else "two")
    summary = audit_figures_task(plan)
    drift = audit_drift_task(plan)
    report = audit_report_task(plan, summary, drift)
    summary.report_file, summary.drift, summary.drift_file = report, drift, str(plan.drift_file())

    create_table_artifact(key="audit-figures", table=figures_artifact(summary),
                          description=f"audit {plan.audit_id}: {plan.version} at threshold {plan.threshold:.4f}; "
                                      f"report {report}")
    create_table_artifact(key="audit-drift", table=drift_artifact(drift),
                          description=f"drift of {len(plan.batch)} shard(s) against the {drift['reference']} reference")
    verdict = verdict_sentence(summary)
    create_markdown_artifact(key="audit-report", markdown=audit_markdown(plan, summary, drift, report),
                             description="audit verdict, drift, and where the report is")
    create_link_artifact(key="audit-report-file", link=f"file://{report}", link_text="audit report (HTML)")
    for sentence in summary.weak_groups:
        logger.warning("below target in a shard subgroup: %s", sentence)
    if drift["flagged"]:
        logger.warning("drift flagged: %s", drift["why"])
    (logger.info if summary.verdict == "passed" else logger.warning)("audit %s: %s; report %s", plan.audit_id,
                                                                     verdict, report)
    if summary.failing:
        raise AuditFailed(
            f"audit of {plan.version} failed: " + "; ".join(summary.failing) + ". The predictions stay in the lake. "
            f"Read the report ({report}); before relying on negatives from these images, add labelled images like "
            f"them to training and re-run `screenline optimize`, or, for a site of its own, choose a site threshold on "
            f"its labelled images (`screenline calibrate --subset NAME`)."
        )
    return AuditReport(summary, report)
