"""The audit report: one self-contained HTML file (plots inline as PNG) that a person reads after a nightly run.

It says first whether the audit passed, then shows per subset the ROC and precision-recall curves with the
operating point marked, the score histograms of positives and negatives with the threshold, the figures table with
both intervals per subset and per shard, the claim each subset's positives support, and the drift check with the
batch's score distribution against the reference. matplotlib's object API (no pyplot): no global state, no display.

It renders what the audit computed and persisted (the figures file, the drift result, the scores audit joined,
handed over as `ReportScores`) and reads nothing else: tasks/audit.py calls it, never the other way round.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from screenline.files import atomic_write_bytes
from tasks.metrics import bound_name, positives_needed
from tasks.thresholds import CURVE_COLUMNS, curve_cells, operating_curve

if TYPE_CHECKING:  # annotations only: the report never calls into the audit
    from tasks.audit import AuditPlan, AuditSummary


@dataclass(frozen=True)
class ReportScores:
    """The scores the audit joined: per labelled image its subset, label and score; the batch's and the drift
    reference's scores."""

    subsets: np.ndarray  # object: the subset of each labelled image
    labels: np.ndarray  # int8
    scores: np.ndarray  # float32, aligned with subsets and labels
    batch: np.ndarray  # the batch's scores (drift)
    reference: np.ndarray  # the reference's scores (drift)

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}.pass{background:#e5f5e5;border-left:6px solid
#2a2;padding:.6em 1em}.fail{background:#fde8e8;border-left:6px solid #c22;padding:.6em 1em}.warn{background:#fff6e0;
border-left:6px solid #d90;padding:.6em 1em}img{max-width:100%}.small{color:#666;font-size:.85em}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _curves(subset: str, scores: np.ndarray, labels: np.ndarray, row: dict[str, Any]) -> str:
    """ROC, precision-recall and score histograms by class for one subset, operating point marked."""
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = Figure(figsize=(13, 3.8))
    roc, pr, hist = fig.subplots(1, 3)
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        roc.plot(fpr, tpr, lw=1.5)
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr.plot(recall, precision, lw=1.5)
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.plot(1 - row["specificity"], row["sensitivity"], "o", color="crimson",
             label=f"threshold {row['threshold']:.4f}")
    roc.axhline(row["target"], ls="--", color="crimson", lw=0.8, label=f"target {row['target']:.0%}")
    roc.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"{subset}: ROC (AUC {row['auc']:.4f})")
    roc.legend(loc="lower right", fontsize=8)
    pr.plot(row["sensitivity"], row["ppv"], "o", color="crimson", label="operating point")
    pr.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title=f"{subset}: precision-recall", ylim=(0, 1.02))
    pr.legend(loc="lower left", fontsize=8)
    bins = np.linspace(0, 1, 41)
    hist.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"negatives ({int((labels == 0).sum())})")
    hist.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"positives ({int(labels.sum())})")
    hist.axvline(row["threshold"], color="crimson", lw=1, label="threshold")
    hist.set(xlabel="score", ylabel="images", yscale="log", title=f"{subset}: scores by class")
    hist.legend(fontsize=8)
    return _png(fig)


def _drift_plot(batch: np.ndarray, reference: np.ndarray, threshold: float, reference_name: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.5))
    dens, cdf = fig.subplots(1, 2)
    bins = np.linspace(0, 1, 41)
    for values, name in ((reference, f"reference: {reference_name} ({len(reference)})"),
                         (batch, f"this batch ({len(batch)})")):
        if len(values):
            dens.hist(values, bins=bins, density=True, alpha=0.55, label=name)
            cdf.plot(np.sort(values), np.arange(1, len(values) + 1) / len(values), label=name)
    for ax in (dens, cdf):
        ax.axvline(threshold, color="crimson", lw=1)
        ax.legend(fontsize=8)
    dens.set(xlabel="score", ylabel="density", yscale="log", title="score distribution")
    cdf.set(xlabel="score", ylabel="fraction ≤ score", title="empirical CDFs (KS = largest vertical gap)")
    return _png(fig)


def _operating_table(subset: str, scores: np.ndarray, labels: np.ndarray, threshold: float) -> str:
    """The subset's operating curve, the decisions' threshold marked. The rows at 95…99% are chosen on these very
    images, so they are the best these images allow, not a threshold's verified figures: said under the table."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in CURVE_COLUMNS)
    body = []
    for row in operating_curve(scores, labels, shipped=None if threshold != threshold else threshold):
        cells = "".join(f"<td>{e(c)}</td>" for c in curve_cells(row))
        body.append(f"<tr{' style=font-weight:bold' if row['at'] == 'shipped' else ''}>{cells}</tr>")
    return (f"<p><b>{e(subset)}: operating curve</b> (bold: the threshold the decisions were made at)</p>"
            f"<table><tr>{head}</tr>{''.join(body)}</table><p class=small>The rows at a sensitivity are the best "
            f"thresholds chosen on these images themselves: what these scores allow here, optimistic as a "
            f"threshold's figures. To set a site threshold and verify it on images it was not chosen on, use "
            f"<code>screenline calibrate --subset {e(subset)}</code>.</p>")


def _ci(row: dict[str, Any], what: str, kind: str) -> str:
    return f"{row[f'{what}_{kind}_low']:.4f}–{row[f'{what}_{kind}_high']:.4f}"


def _ratio(value: float) -> str:
    """A proportion to 4 places, or n/a where it has no denominator (no positives, one class)."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _table(rows: list[dict[str, Any]]) -> str:
    site = any(r.get("operating_point", "shipped") != "shipped" for r in rows)
    head = ("<tr><th class=l>subset</th><th class=l>group</th><th>n</th><th>pos</th><th>TP</th><th>FN</th>"
            "<th>TN</th><th>FP</th><th>sensitivity</th><th>exact 95% CI (two-sided)</th><th>Wilson 95% CI</th>"
            "<th>specificity</th><th>exact 95% CI (two-sided)</th><th>Wilson 95% CI</th><th>PPV</th><th>NPV</th>"
            "<th>AUC</th>" + ("<th>sensitivity at shipped</th><th>specificity at shipped</th>" if site else "")
            + "<th class=l>verdict</th></tr>")
    body = []
    for r in rows:
        mark = {"passed": "passed", "failed": "<b>FAILED</b>"}.get(r["verdict"], "inconclusive") + (
            "" if r["positives"] else " (no positives)")
        body.append(
            f"<tr><td class=l>{html.escape(r['subset'])}</td><td class=l>{html.escape(r['group'])}</td>"
            f"<td>{r['n']}</td><td>{r['positives']}</td><td>{r['tp']}</td><td>{r['fn']}</td><td>{r['tn']}</td>"
            f"<td>{r['fp']}</td><td>{_ratio(r['sensitivity'])}</td><td>{_ci(r, 'sensitivity', 'cp')}</td>"
            f"<td>{_ci(r, 'sensitivity', 'wilson')}</td><td>{_ratio(r['specificity'])}</td>"
            f"<td>{_ci(r, 'specificity', 'cp')}</td><td>{_ci(r, 'specificity', 'wilson')}</td>"
            f"<td>{_ratio(r['ppv'])}</td><td>{_ratio(r['npv'])}</td><td>{_ratio(r['auc'])}</td>"
            + (f"<td>{_ratio(r['shipped_sensitivity'])}</td><td>{_ratio(r['shipped_specificity'])}</td>"
               if site else "")
            + f"<td class=l>{mark}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render_report(plan: AuditPlan, summary: AuditSummary, drift: dict[str, Any], joined: ReportScores) -> str:
    """The report's HTML."""
    rows = pq.read_table(plan.figures_file()).to_pylist()
    subsets, labels, scores = joined.subsets, joined.labels, joined.scores
    e = html.escape
    parts = [(f"<!doctype html><html><head><meta charset=utf-8><title>screenline audit {e(plan.audit_id)}</title>"
              f"<style>{CSS}</style></head><body><h1>Sensitivity audit</h1>"),
             (f"<p>model <b>{e(plan.version)}</b> ({e(plan.engine)} {e(plan.precision)}), threshold "
             f"<b>{plan.threshold:.4f}</b> ({e(plan.threshold_source)}, operating point {e(plan.operating_point)}"
             + (f"; shipped threshold {plan.shipped_threshold:.4f}, whose figures are shown beside"
                if plan.operating_point != "shipped" else "")
             + f"), target sensitivity <b>{plan.target:.0%}</b>; audit <code>{e(plan.audit_id)}</code> of "
               f"<code>{e(plan.lake_root)}</code></p>")]
    if plan.chosen_on and plan.chosen_on in plan.subsets:
        parts.append(f"<div class=warn>The site threshold was chosen on half of subset <b>{e(plan.chosen_on)}</b>: "
                     f"that subset is judged by its other (verification) half alone; figures on the whole subset "
                     f"include the images the threshold was chosen on.</div>")
    if not plan.subsets:
        parts.append("<div class=warn><b>NOT AUDITED: no labelled subsets in the lake, so sensitivity was not "
                     "measured.</b> Ingest a labelled shard with <code>screenline ingest PATH --subset NAME</code>."
                     "</div>")
    elif summary.failing:
        parts.append("<div class=fail><b>FAILED: sensitivity below target.</b><ul>"
                     + "".join(f"<li>{e(s)}</li>" for s in summary.failing)
                     + "</ul>Do not rely on negatives from these images until this is resolved: look at the "
                       "subset's missed positives, add labelled data like it to training and re-run optimize, or, "
                       "for a site of its own, choose a site threshold on its labelled images (screenline calibrate "
                       "--subset NAME). The predictions stay in the lake.</div>")
    elif summary.inconclusive:
        parts.append("<div class=warn><b>INCONCLUSIVE: the target is not shown.</b> No subset is below target, but "
                     "these cannot show it at the exact 95% lower bound:<ul>"
                     + "".join(f"<li>{e(s)}</li>" for s in summary.inconclusive)
                     + "</ul>Add labelled positives to these subsets before relying on this audit.</div>")
    else:
        parts.append("<div class=pass><b>PASSED:</b> every audited subset's positives support the target at the "
                     "exact 95% lower bound.</div>")
    if summary.weak_groups:
        parts.append("<div class=warn><b>Shards below target</b> (small groups: read with their intervals)<ul>"
                     + "".join(f"<li>{e(s)}</li>" for s in summary.weak_groups) + "</ul></div>")
    parts.append(f"<div class={'warn' if drift['flagged'] else 'pass'}><b>Drift: "
                 f"{'FLAGGED' if drift['flagged'] else 'none'}</b> — {e(drift['why'])}. Batch of "
                 f"{drift['batch_n']} image(s) from {len(plan.batch)} shard(s) against the {e(drift['reference'])} "
                 f"reference ({drift['reference_n']} scores).</div>")
    if plan.subsets:
        parts.append("<h2>Figures</h2>" + _table(rows))
        parts.append("<h2>What the positives support</h2><ul>" + "".join(
            f"<li><b>{e(r['subset'])}</b> ({e(r['group'])}): {e(r['claim'])}</li>" for r in rows
            if r["group_kind"] == "subset") + "</ul>")
        parts.append("<h2>Curves</h2>")
        for row in (r for r in rows if r["group_kind"] == "subset"):
            mask = subsets == row["subset"]
            parts.append(_curves(row["subset"], scores[mask], labels[mask], row))
            if 0 < labels[mask].sum() < mask.sum():
                parts.append(_operating_table(row["subset"], scores[mask], labels[mask], row["threshold"]))
    parts.append("<h2>Drift</h2>" + _drift_plot(joined.batch, joined.reference, plan.threshold, drift["reference"]))
    parts.append(
        "<p class=small>Sensitivity and specificity intervals: two-sided 95%, exact (Clopper-Pearson) and Wilson "
        f"score. A subset supports the target when the {e(bound_name(0.95, plan.sided))} reaches it (with no miss "
        f"that takes at least {positives_needed(plan.target, 0, 0.95, plan.sided)} positives for "
        f"{plan.target:.0%}). Drift: two-sample Kolmogorov-Smirnov test of this batch's scores against the "
        f"reference, flagged when p &lt; {plan.drift.ks_alpha} and the statistic ≥ {plan.drift.min_ks_statistic}, "
        f"or when the positive rate moves by more than {plan.drift.max_rate_change}. Figures: "
        f"<code>{e(str(plan.figures_file()))}</code>; drift: <code>{e(str(plan.drift_file()))}</code>.</p>"
        "</body></html>")
    return "\n".join(parts)


def write_report(plan: AuditPlan, summary: AuditSummary, drift: dict[str, Any], joined: ReportScores) -> Path:
    """Render the report and write it atomically; returns its path."""
    path = plan.report_file()
    atomic_write_bytes(path, render_report(plan, summary, drift, joined).encode())
    return path
