"""Auditing: sensitivity on labelled subsets with confidence intervals, per subset and per shard, and score drift.

An audit reads a model version's predictions and the labels of the lake's labelled subsets (images ingested with
`--subset NAME`), and writes, under one content-keyed audit id:

    lake/audits/figures/<audit_id>.parquet   a row per subset and per subset × shard: the 2×2 table, sensitivity
                                             and specificity with Clopper-Pearson and Wilson 95% intervals, PPV,
                                             NPV, AUC, the threshold, the model, and whether the positives suffice
                                             to claim the target at the exact lower bound
    lake/audits/drift/<audit_id>.parquet     this batch's scores against a reference: KS test, positive rates
    lake/audits/reports/<audit_id>.html      the report a person reads (tasks/report.py)

The audit id is a hash of what the audit reads (model, threshold, target, the predictions' run ids and the images
they scored, the batch), so auditing unchanged predictions again finds the same files instead of writing new ones.

What is audited is verified, not assumed: only current predictions are read (tasks/predictions.py: made from the
images the lake holds now, decided at the version's threshold now), every labelled image of an audited subset must
have exactly one of them (`AuditIncomplete` otherwise), and the 2×2 tables count the decisions as screen recorded
them (each prediction's own threshold) unless a threshold override asks what another threshold would do.

Verdicts, per subset: *failed* when the sensitivity point estimate is below target; *passed* only when the positives
support the target at the exact (Clopper-Pearson) 95% lower bound; otherwise *inconclusive* (no positives, or too
few for the bound to reach the target). An audit passes only if every subset passes: a subset without the positives
to show the target never reads as a pass.

Drift reference: the shipped engine's scores on the model's validation split (`reference-scores.parquet`, written
by optimize and hashed in the manifest); for a model registered without one, this version's scores of the lake's
other shards (earlier nights). A batch drifts when the KS test rejects at `ks_alpha` *and* the KS statistic is at
least `min_ks_statistic` (with thousands of images, any difference is "significant"; the effect size says whether
it matters), or when its predicted-positive rate moves by more than `max_rate_change` from the reference's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import task

from models.registry import Registry
from screenline.files import safe_name
from tasks.caching import IO_RETRIES, OutputCache, content_key
from tasks.lake import (DRIFT_SCHEMA, FIGURES_SCHEMA, LANDED_WITH_KEY, SHARD_PATH_KEY, Lake, footer, images_digest,
                        shard_id_of, write_table_atomic)
from tasks.metrics import SIDES, Figures, claim, figures, table_at
from tasks.predictions import RUN_KEY, State, current_files, read_current
from tasks.report import ReportScores, write_report
from tasks.thresholds import in_calibration_half

REFERENCE_FILE = "reference-scores.parquet"
"""In a model's folder: its shipped engine's validation scores and labels, the default drift reference."""


class AuditFailed(RuntimeError):
    """A labelled subset's sensitivity is below target. The predictions stay in the lake."""


class AuditIncomplete(ValueError):
    """The predictions do not cover the audited images exactly once: figures would be wrong, so none are made."""


def subset_verdict(f: Figures, target: float, supported: bool) -> str:
    """failed (point estimate below target), passed (the exact lower bound reaches it), else inconclusive."""
    if f.positives and f.sensitivity < target:
        return "failed"
    return "passed" if supported else "inconclusive"


@dataclass(frozen=True)
class DriftSettings:
    """When a batch's scores count as drifted from the reference."""

    ks_alpha: float = 0.01
    min_ks_statistic: float = 0.1
    max_rate_change: float = 0.05  # absolute change in the fraction flagged positive


@dataclass(frozen=True)
class AuditPlan:
    """What one audit reads: small, content-keyed, passed between the audit's tasks."""

    lake_root: str
    audit_id: str
    version: str
    engine: str
    precision: str
    threshold: float
    threshold_source: str  # "as decided" (each prediction's own, the manifest's) | "override"
    target: float
    subsets: tuple[str, ...]
    batch: tuple[str, ...]  # shard ids whose scores are checked for drift
    runs: tuple[tuple[str, ...], ...]  # (shard_id, run_id, images digest, landed with) of every predictions file read
    drift: DriftSettings = DriftSettings()
    sided: str = "two"  # the claim's exact lower bound: of the two-sided 95% interval, or one-sided 95%
    shipped_threshold: float = float("nan")  # what optimize shipped, shown beside the decisions
    operating_point: str = "shipped"  # which point decides: "shipped", or "site:<subset>"
    chosen_on: str | None = None  # the subset a deciding site point was chosen on (judged by its verification half)
    gated_on: tuple[str, ...] = ()  # subsets that were in the version's held-out test split (optimize --test-subset)

    @property
    def lake(self) -> Lake:
        return Lake.at(self.lake_root)

    @property
    def overridden(self) -> bool:
        return self.threshold_source == "override"

    def figures_file(self) -> Path:
        return self.lake.figures_file(self.audit_id)

    def drift_file(self) -> Path:
        return self.lake.drift_file(self.audit_id)

    def report_file(self) -> Path:
        return self.lake.report_file(self.audit_id)

    def prediction_files(self) -> dict[str, Path]:
        """The predictions files the plan read, checked to be the same ones still: an audit never mixes figures from
        predictions written after it was planned."""
        manifest = Registry(self.lake).manifest(self.version)
        current, _ = current_files(self.lake, self.version, manifest)
        for shard_id, run_id, *_ in self.runs:
            if shard_id not in current or _footer_run(current[shard_id]) != run_id:
                raise AuditIncomplete(f"the predictions of shard {shard_id} by {self.version} changed since this "
                                      f"audit was planned (a screen ran meanwhile): run the audit again")
        return {shard_id: current[shard_id] for shard_id, *_ in self.runs}


@dataclass
class AuditSummary:
    """What an audit found, small enough for artifacts and flow results; the figures are in the lake."""

    audit_id: str
    version: str
    threshold: float
    target: float
    subsets: list[dict[str, Any]] = field(default_factory=list)  # the rows with group == "all"
    failing: list[str] = field(default_factory=list)  # one sentence per subset below target
    inconclusive: list[str] = field(default_factory=list)  # one sentence per subset that cannot show the target
    weak_groups: list[str] = field(default_factory=list)  # shard subgroups below target (warnings)
    drift: dict[str, Any] = field(default_factory=dict)
    figures_file: str = ""
    drift_file: str = ""
    report_file: str = ""

    @property
    def verdict(self) -> str:
        """failed if any subset failed; passed only if every subset passed; not audited without subsets; else
        inconclusive."""
        if self.failing:
            return "failed"
        if not self.subsets:
            return "not audited"
        return "inconclusive" if self.inconclusive else "passed"


# --- reading the lake ----------------------------------------------------------------------------------------------


def _shard_names(lake: Lake) -> dict[str, str]:
    """shard_id → the shard's file or folder name, as given to ingest."""
    return {file.stem: Path(footer(file).get(SHARD_PATH_KEY, file.stem)).name for file in lake.shard_files()}


def _footer_run(file: Path) -> str:
    return footer(file).get(RUN_KEY, "")


def labelled_subsets(lake: Lake) -> pa.Table:
    """image_id, shard_id, label, subset of every labelled image in a named subset. An images file that cannot be
    read stops the audit, naming it: its labelled images cannot be counted, so no figure could be whole."""
    files = lake.shard_files()
    for file in files:
        try:
            pq.read_metadata(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"the images file {file} cannot be read ({exc}): delete it and re-ingest the shard; "
                             f"until then no audit can count the labelled images it held") from None
    if not files:
        return pa.table({"image_id": pa.array([], pa.string()), "shard_id": pa.array([], pa.string()),
                         "label": pa.array([], pa.int8()), "subset": pa.array([], pa.string())})
    return ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["image_id", "shard_id", "label", "subset"],
        filter=pc.field("subset").is_valid() & pc.field("label").is_valid(),
    )


def _not_current(shard_ids: list[str], stale: dict[str, State], version: str, what: str) -> str:
    first = shard_ids[0]
    why = stale[first].why if first in stale else "never scored"
    return (f"{len(shard_ids)} shard(s) of {what} have no current predictions by {version} (e.g. {first}: {why}): "
            f"run `screenline screen` first")


def plan_audit(lake: Lake, version: str | None = None, subsets: list[str] | None = None,
               batch: list[str] | None = None, threshold: float | None = None, target: float | None = None,
               drift: DriftSettings = DriftSettings(), sided: str = "two") -> AuditPlan:
    """Decide what an audit reads, and check it can be done: the subsets exist and every shard in them has current
    predictions (made from the images it holds now, decided at the version's threshold now).

    version: default the promoted one. subsets: default every labelled subset in the lake. batch: the shard ids
    whose scores are checked for drift (default: those the newest screen run of `version` wrote). threshold:
    default the decisions as screen recorded them (an override re-decides every prediction). target: default the
    model's gate. sided: whether a claim rests on the lower end of the two-sided exact 95% interval ("two", a
    one-sided 97.5% bound) or on the one-sided exact 95% bound ("one").
    """
    if sided not in SIDES:
        raise ValueError(f"sided must be one of {', '.join(SIDES)}, got {sided!r}")
    registry = Registry(lake)
    version = safe_name(version, "model version") if version else registry.promoted()
    manifest = registry.manifest(version)
    ship = manifest.shipping
    target = float(target if target is not None else manifest.target_sensitivity)
    files, stale = current_files(lake, version, manifest)
    if not files and not stale:
        raise ValueError(f"no predictions by {version} in {lake.predictions_dir(version)}: run `screenline screen` "
                         f"first")
    labelled = labelled_subsets(lake)
    found = sorted(set(labelled.column("subset").to_pylist()))
    wanted = sorted(set(subsets)) if subsets else found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise ValueError(f"no labelled images in subset(s) {', '.join(missing)} of {lake.root} (subsets here: "
                         f"{', '.join(found) or 'none'}); ingest labelled shards with `--subset NAME`")
    subset_shards = sorted({s for s, name in zip(labelled.column("shard_id").to_pylist(),
                                                 labelled.column("subset").to_pylist()) if name in wanted})
    unscored = [s for s in subset_shards if s not in files]
    if unscored:
        raise ValueError(_not_current(unscored, stale, version, f"subset(s) {', '.join(wanted)}"))
    if batch is None:
        newest = max(files.values(), key=lambda f: f.stat().st_mtime_ns, default=None)
        batch_run = _footer_run(newest) if newest else None
        batch = [s for s, f in files.items() if _footer_run(f) == batch_run]
    batch = sorted({shard_id_of(s) for s in batch})
    unscored = [s for s in batch if s not in files]
    if unscored:
        raise ValueError(_not_current(unscored, stale, version, "the drift batch"))
    # what each shard holds and how it landed (a re-delivery with new labels or subsets lands the same ids again)
    runs = tuple((s, _footer_run(files[s]), images_digest(lake.image_file(s)),
                  footer(lake.image_file(s)).get(LANDED_WITH_KEY, "")) for s in sorted(set(subset_shards) | set(batch)))
    source = "as decided" if threshold is None else "override"
    deciding, point_name = manifest.decided_at(ship)
    site = manifest.site_point(ship)
    threshold = float(deciding if threshold is None else threshold)
    key = content_key("audit/v3", version, manifest.seal, threshold, source, target, wanted, batch, runs,
                      asdict(drift), sided)
    return AuditPlan(str(lake.root), f"{version}-{key[:12]}", version, ship.engine, ship.precision, threshold,
                     source, target, tuple(wanted), tuple(batch), runs, drift, sided, float(ship.threshold),
                     point_name, site["subset"] if site else None, manifest.test_subsets)


def scores_of(plan: AuditPlan, shard_ids: list[str] | tuple[str, ...]) -> pa.Table:
    """image_id, score, threshold, engine of every current prediction the plan read for these shards."""
    return read_current(plan.prediction_files(), shard_ids, ["image_id", "score", "threshold", "engine"])


# --- figures -------------------------------------------------------------------------------------------------------


def labelled_scores(plan: AuditPlan) -> pa.Table:
    """image_id, subset, shard_id, label, score, threshold, engine of every labelled image the plan audits: exactly
    one current prediction each, or AuditIncomplete saying which images are missing or doubled."""
    labelled = labelled_subsets(plan.lake).filter(pc.field("subset").isin(pa.array(plan.subsets, pa.string())))
    scored = scores_of(plan, sorted(set(labelled.column("shard_id").to_pylist())))
    for table, what in ((labelled, "the lake's images"), (scored, f"the predictions of {plan.version}")):
        ids = table.column("image_id")
        if pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            twice = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
            raise AuditIncomplete(f"image {twice} appears more than once in {what}: the audit would count it twice; "
                                  f"refusing to make figures (re-run `screenline screen`; if it persists, the lake "
                                  f"was altered outside screenline)")
    joined = labelled.join(scored, "image_id", join_type="inner")
    if joined.num_rows != labelled.num_rows:
        unmatched = labelled.filter(pc.invert(pc.is_in(labelled.column("image_id"), scored.column("image_id"))))
        first = unmatched.slice(0, 1).to_pylist()[0]
        raise AuditIncomplete(f"{unmatched.num_rows} labelled image(s) of subset(s) {', '.join(plan.subsets)} have no "
                              f"current prediction by {plan.version} (e.g. {first['image_id']} in shard "
                              f"{first['shard_id']}): run `screenline screen`, then audit again")
    return joined.select(["image_id", "subset", "shard_id", "label", "score", "threshold", "engine"])


def audit_figures(plan: AuditPlan) -> AuditSummary:
    """Figures per subset and per subset × shard, at the decisions screen recorded (or the plan's override
    threshold), with the shipped threshold's beside them, written to the figures file. A subset the deciding site
    threshold was chosen on is judged by its verification half alone (tasks/calibrate.py), and says so."""
    table = labelled_scores(plan)
    names = _shard_names(plan.lake)
    subsets = np.asarray(table.column("subset").to_pylist(), dtype=object)
    shards = np.asarray(table.column("shard_id").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    scores = table.column("score").to_numpy(zero_copy_only=False)
    decided = table.column("threshold").to_numpy(zero_copy_only=False)
    thresholds = np.full(len(scores), plan.threshold, np.float32) if plan.overridden else decided
    calibration_half = np.array([in_calibration_half(i) for i in table.column("image_id").to_pylist()], dtype=bool)
    now = datetime.now(timezone.utc)
    rows, summary = [], AuditSummary(plan.audit_id, plan.version, plan.threshold, plan.target)

    def row_of(subset: str, kind: str, group: str, shard_id: str, mask: np.ndarray) -> tuple[dict, Figures]:
        f = figures(scores[mask], labels[mask], thresholds[mask])
        supported, needed, sentence = claim(f, plan.target, sided=plan.sided)
        used = np.unique(thresholds[mask])
        shipped = table_at(scores[mask], labels[mask], np.float32(plan.shipped_threshold))
        return {"audit_id": plan.audit_id, "audited_at": now, "subset": subset, "group_kind": kind, "group": group,
                "shard_id": shard_id, **asdict(f), "threshold": float(used[0]) if len(used) == 1 else float("nan"),
                "target": plan.target, "meets_target": bool(f.positives) and f.sensitivity >= plan.target,
                "claim_supported": supported, "positives_needed": needed, "claim": sentence,
                "verdict": subset_verdict(f, plan.target, supported), "model_version": plan.version,
                "engine": plan.engine, "precision": plan.precision, "threshold_source": plan.threshold_source,
                "operating_point": plan.operating_point, "shipped_threshold": plan.shipped_threshold,
                "shipped_sensitivity": shipped.sensitivity, "shipped_specificity": shipped.specificity}, f

    for subset in plan.subsets:
        in_subset = subsets == subset
        chosen_here = subset == plan.chosen_on and not plan.overridden
        groups = ([("half", "verification half", "", in_subset & ~calibration_half),
                   ("half", "calibration half", "", in_subset & calibration_half)] if chosen_here else []) + [
            ("shard", names.get(s, s), s, in_subset & (shards == s)) for s in sorted(set(shards[in_subset]))]
        row, f = row_of(subset, "subset", "all", "", in_subset)
        group_rows = [row_of(subset, *group) for group in groups]
        if chosen_here:  # the threshold was chosen on the other half: only the verification half is independent
            verification, f = group_rows[0]
            row.update(verdict=verification["verdict"], claim_supported=verification["claim_supported"],
                       claim=(f"judged on its verification half only (the site threshold was chosen on the other "
                              f"half): {verification['claim']}"))
        if subset in plan.gated_on:  # it decided promotion: the audit reads it again, it does not check it afresh
            row["claim"] = (f"not an independent check: this subset was in the held-out test split that gated "
                            f"{plan.version}'s promotion (optimize --test-subset {subset}); {row['claim']}")
        rows += [row] + [r for r, _ in group_rows]
        summary.subsets.append(row)
        for r, g in [(row, f)] + [(r, g) for r, g in group_rows if r["group_kind"] == "shard"]:
            where = f"subset {subset!r}" + (f" shard {r['group']}" if r["group_kind"] == "shard" else "") + (
                " (verification half)" if chosen_here and r is row else "")
            if r["verdict"] == "failed":
                sentence = (f"{where}: sensitivity {g.sensitivity:.4f} ({g.tp}/{g.positives} positives found; "
                            f"95% CI {g.sensitivity_cp_low:.4f}–{g.sensitivity_cp_high:.4f} exact, "
                            f"{g.sensitivity_wilson_low:.4f}–{g.sensitivity_wilson_high:.4f} Wilson) is below the "
                            f"target {plan.target} at threshold {_thresholds(np.unique(thresholds[in_subset]))}")
                (summary.failing if r is row else summary.weak_groups).append(sentence)
            elif r["verdict"] == "inconclusive" and r is row:
                summary.inconclusive.append(f"{where}: {r['claim']}")
    write_table_atomic(plan.figures_file(), pa.Table.from_pylist(rows, FIGURES_SCHEMA))
    summary.figures_file = str(plan.figures_file())
    return summary


def _thresholds(used: np.ndarray) -> str:
    return f"{used[0]:.4f}" if len(used) == 1 else "s " + ", ".join(f"{t:.4f}" for t in used)


# --- drift ---------------------------------------------------------------------------------------------------------


def reference_scores(plan: AuditPlan) -> tuple[str, np.ndarray]:
    """The drift reference: the model's validation scores (verified against the manifest), else this version's
    scores of the lake's other shards."""
    registry = Registry(plan.lake)
    if REFERENCE_FILE in registry.manifest(plan.version).files:
        path = registry.verified_file(plan.version, REFERENCE_FILE)
        return "validation", pq.read_table(path, columns=["score"]).column("score").to_numpy()
    current, _ = current_files(plan.lake, plan.version, registry.manifest(plan.version))
    others = [s for s in current if s not in plan.batch]
    return "earlier shards", read_current(current, others, ["score"]).column("score").to_numpy()


def drift_check(batch: np.ndarray, reference: np.ndarray, threshold: float,
                settings: DriftSettings = DriftSettings()) -> dict[str, Any]:
    """Two-sample KS on scores and the change in predicted-positive rate; `flagged` with the reason."""
    from scipy import stats

    if len(batch) == 0 or len(reference) == 0:
        return {"batch_n": len(batch), "reference_n": len(reference), "ks_statistic": float("nan"),
                "ks_pvalue": float("nan"), "batch_positive_rate": float("nan"),
                "reference_positive_rate": float("nan"), "batch_mean_score": float("nan"),
                "reference_mean_score": float("nan"), "flagged": False,
                "why": "not checked: " + ("the batch is empty" if len(batch) == 0 else "no reference scores")}
    ks = stats.ks_2samp(batch, reference)
    rate, ref_rate = float(np.mean(batch >= threshold)), float(np.mean(reference >= threshold))
    reasons = []
    if ks.pvalue < settings.ks_alpha and ks.statistic >= settings.min_ks_statistic:
        reasons.append(f"score distribution shifted (KS {ks.statistic:.3f}, p={ks.pvalue:.2g})")
    if abs(rate - ref_rate) > settings.max_rate_change:
        reasons.append(f"positive rate {rate:.3f} vs {ref_rate:.3f} in the reference")
    return {"batch_n": len(batch), "reference_n": len(reference), "ks_statistic": float(ks.statistic),
            "ks_pvalue": float(ks.pvalue), "batch_positive_rate": rate, "reference_positive_rate": ref_rate,
            "batch_mean_score": float(np.mean(batch)), "reference_mean_score": float(np.mean(reference)),
            "flagged": bool(reasons),
            "why": "; ".join(reasons) or f"no drift (KS {ks.statistic:.3f}, p={ks.pvalue:.2g}; positive rate "
                                         f"{rate:.3f} vs {ref_rate:.3f})"}


def audit_drift(plan: AuditPlan) -> dict[str, Any]:
    """Drift of the plan's batch against the reference, written to the drift file."""
    name, reference = reference_scores(plan)
    batch = scores_of(plan, plan.batch).column("score").to_numpy()
    result = {"audit_id": plan.audit_id, "audited_at": datetime.now(timezone.utc), "reference": name,
              **drift_check(batch, reference, plan.threshold, plan.drift), "batch_shards": list(plan.batch),
              "model_version": plan.version, "threshold": plan.threshold}
    write_table_atomic(plan.drift_file(), pa.Table.from_pylist([result], DRIFT_SCHEMA))
    return {k: v for k, v in result.items() if k != "audited_at"}


def report_scores(plan: AuditPlan) -> ReportScores:
    """The scores the report draws: the labelled images' (as figures joined them), the batch's and the reference's."""
    labelled = labelled_scores(plan)
    return ReportScores(subsets=np.asarray(labelled.column("subset").to_pylist(), dtype=object),
                        labels=labelled.column("label").to_numpy(zero_copy_only=False).astype(np.int8),
                        scores=labelled.column("score").to_numpy(zero_copy_only=False),
                        batch=scores_of(plan, plan.batch).column("score").to_numpy(),
                        reference=reference_scores(plan)[1])


# --- what the flow shows (artifacts) -------------------------------------------------------------------------------

FIGURES_ARTIFACT_COLUMNS = ("subset", "n", "positives", "tp", "fn", "sensitivity", "sensitivity_cp_low",
                            "sensitivity_cp_high", "sensitivity_wilson_low", "sensitivity_wilson_high", "specificity",
                            "ppv", "npv", "auc", "verdict", "claim")
DRIFT_ARTIFACT_COLUMNS = ("reference", "batch_n", "reference_n", "ks_statistic", "ks_pvalue", "batch_positive_rate",
                          "reference_positive_rate", "flagged", "why")


def figures_artifact(summary: AuditSummary) -> list[dict[str, Any]]:
    """A row per subset, rounded for reading."""
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in FIGURES_ARTIFACT_COLUMNS}
            for row in summary.subsets]


def drift_artifact(drift: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: drift[k] for k in DRIFT_ARTIFACT_COLUMNS}]


def verdict_sentence(summary: AuditSummary) -> str:
    """The audit's verdict as the log and the artifacts say it; never "passed" for an audit that did not show it."""
    return {
        "failed": "FAILED: " + "; ".join(summary.failing),
        "inconclusive": "INCONCLUSIVE (the target is not shown): " + "; ".join(summary.inconclusive),
        "not audited": "NOT AUDITED: the lake has no labelled subsets, so sensitivity was not measured",
        "passed": "passed: every subset's positives support the target at the exact 95% lower bound",
    }[summary.verdict]


def audit_markdown(plan: AuditPlan, summary: AuditSummary, drift: dict[str, Any], report: str) -> str:
    """The verdict, each subset's figures and claim, the drift check and where the report is."""
    return (f"# Audit {plan.audit_id}\n\n**{verdict_sentence(summary)}**\n\n"
            + "".join(f"- **{r['subset']}** ({r['verdict']}): sensitivity {r['sensitivity']:.4f} (exact 95% CI "
                      f"{r['sensitivity_cp_low']:.4f}–{r['sensitivity_cp_high']:.4f}), specificity "
                      f"{r['specificity']:.4f}, {r['claim']}\n" for r in summary.subsets)
            + f"\n**Drift: {'FLAGGED' if drift['flagged'] else 'none'}** — {drift['why']}\n\nReport: `{report}`\n")


# --- tasks ---------------------------------------------------------------------------------------------------------


@task(name="plan-audit", **IO_RETRIES)
def plan_audit_task(lake_root: str, version: str | None, subsets: list[str] | None, batch: list[str] | None,
                    threshold: float | None, target: float | None, sided: str = "two") -> AuditPlan:
    """What the audit reads, keyed on its content."""
    return plan_audit(Lake.at(lake_root), version, subsets, batch, threshold, target, sided=sided)


@task(name="audit-figures", cache_policy=OutputCache(namespace="audit-figures/v1",
                                                     output=lambda i: i["plan"].figures_file()),
      persist_result=True, **IO_RETRIES)
def audit_figures_task(plan: AuditPlan) -> AuditSummary:
    """Figures per subset and shard (cached on the plan: unchanged predictions are not audited twice)."""
    return audit_figures(plan)


@task(name="audit-drift", cache_policy=OutputCache(namespace="audit-drift/v1",
                                                   output=lambda i: i["plan"].drift_file()),
      persist_result=True, **IO_RETRIES)
def audit_drift_task(plan: AuditPlan) -> dict[str, Any]:
    """The batch's score drift against the reference."""
    return audit_drift(plan)


@task(name="audit-report", cache_policy=OutputCache(namespace="audit-report/v1",
                                                    output=lambda i: i["plan"].report_file()),
      persist_result=True, **IO_RETRIES)
def audit_report_task(plan: AuditPlan, summary: AuditSummary, drift: dict[str, Any]) -> str:
    """The HTML report; returns its path."""
    return str(write_report(plan, summary, drift, report_scores(plan)))
