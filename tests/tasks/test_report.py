"""The audit report renders what the audit computed and handed it: the figures file and the joined scores."""

from __future__ import annotations

import html
import shutil

import numpy as np

from helpers import images, register_model, screen_plain
from tasks.audit import audit_drift, audit_figures, plan_audit
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.report import ReportScores, render_report
from tasks.samples import write_tar
from tasks.shards import fingerprint
from tasks.thresholds import curve_cells, operating_curve


def test_the_report_draws_the_scores_it_is_handed_and_reads_no_predictions(tmp_path):
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "hold.tar", *images(40, "report-hold", prevalence=0.5), prefix="h")
    ingest_shard(fingerprint(tmp_path / "hold.tar"), lake, IngestOptions(channels=1, subset="holdout"))
    register_model(lake.root, "sn-report", seed=2, threshold=0.0)
    screen_plain(lake)
    plan = plan_audit(lake)
    summary, drift = audit_figures(plan), audit_drift(plan)
    # scores unlike the model's: if the page shows their operating curve, it drew what it was handed
    labels = np.r_[np.ones(300, np.int8), np.zeros(200, np.int8)]
    scores = np.r_[np.linspace(0.3, 1.0, 300), np.linspace(0.0, 0.6, 200)].astype(np.float32)
    handed = ReportScores(subsets=np.array(["holdout"] * 500, dtype=object), labels=labels, scores=scores,
                          batch=scores[:50], reference=scores[50:])
    shutil.rmtree(lake.predictions)  # the report must not need them: audit already joined what it draws
    page = render_report(plan, summary, drift, handed)
    for row in operating_curve(scores, labels, shipped=0.0):
        assert "".join(f"<td>{html.escape(c)}</td>" for c in curve_cells(row)) in page, row["at"]
    assert f"model <b>{plan.version}</b>" in page and "INCONCLUSIVE" in page  # 20-odd positives cannot show 98%
