"""Site recalibration: a threshold for a site's own images, chosen on half of a labelled local subset and verified on
the other half.

A site's images differ from the training distribution in ways no threshold chosen on that distribution can see.
`screenline calibrate --subset NAME` takes a labelled subset of the site's images (ingested with `--subset`), splits
it by image hash into a calibration half and a verification half (an image is always in the same half), chooses the
threshold on the first with the rule optimize used (PAC: sensitivity ≥ target with probability ≥ 1 − δ), and
reports the second, which played no part in the choice: sensitivity and specificity with exact intervals, normals
flagged per 1,000 screened, and whether its positives support the target; beside the same figures at the shipped
threshold.

Refused, saying how many positives it would need, when the calibration half is too small for the rule's guarantee;
when the verification half's sensitivity at the new threshold is below target; or when another labelled subset of
the lake would fall below target at it. One threshold decides every image of a lake (per engine and graph), so a
site threshold belongs in a lake of that site's images: a lake that also holds other sites' labelled images, which
the site threshold would fail, is the wrong place to apply it. `--apply` records the point in the
version's manifest with its provenance (subset, halves, figures, rule, date) and signs it again: screening then
decides with it (every prediction names its operating point), and audits show it beside the shipped threshold,
judging the subset it was chosen on by its verification half alone. Every calibration, applied or not, is kept as
`lake/audits/calibrations/<id>.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from prefect import task

from models.manifest import Manifest, point_key
from models.registry import Registry
from screenline.files import atomic_write_bytes, safe_name
from tasks.audit import labelled_scores, labelled_subsets, plan_audit
from tasks.caching import IO_RETRIES, content_key
from tasks.lake import Lake
from tasks.metrics import claim, figures
from tasks.thresholds import ThresholdRule, calibrate, in_calibration_half, pac_positives_needed, point

"""Manifest field: every site point applied or reset, newest last."""


class CalibrationRefused(ValueError):
    """A subset that cannot support a site threshold (too few positives, or the verification half falls short)."""


@dataclass
class SiteCalibration:
    """A site threshold chosen on one half of a subset and verified on the other."""

    calibration_id: str
    version: str
    subset: str
    engine: str
    file: str
    shipped_threshold: float
    calibration: dict  # tasks.thresholds.Calibration on the calibration half
    halves: dict  # images and positives in each half
    verification: dict  # the verification half at the new threshold: figures, normals per 1,000, claim
    verification_at_shipped: dict  # the verification half at the shipped threshold
    created_at: str
    elsewhere: dict = field(default_factory=dict)  # every other labelled subset of the lake at the new threshold
    refused: str | None = None
    applied: bool = False
    record_file: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"site:{self.subset}"

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])


def _figures_at(scores: np.ndarray, labels: np.ndarray, threshold: float, target: float, sided: str) -> dict:
    f = figures(scores, labels, threshold)
    supported, needed, sentence = claim(f, target, sided=sided)
    return {**asdict(f), **point(scores, labels, threshold), "claim": sentence, "claim_supported": supported,
            "positives_needed": needed}


def site_calibration(lake: Lake, subset: str, version: str | None = None, engine: str = "auto",
                     delta: float | None = None, sided: str = "two") -> SiteCalibration:
    """Choose a threshold on the calibration half of `subset` and verify it on the other half (nothing applied).

    version: default the promoted one. delta: default the version's own (its gates). sided: the verification
    claim's bound, as for audit."""
    registry = Registry(lake)
    pick = registry.pick(version, engine)
    version = pick.version
    manifest = registry.manifest(version)
    rule = ThresholdRule("pac", manifest.target_sensitivity,
                         float(delta if delta is not None else manifest.gates.get("delta", 0.05)))
    plan = plan_audit(lake, version, subsets=[subset], batch=[], sided=sided)
    table = labelled_scores(plan)
    engines = set(table.column("engine").to_pylist())
    if engines != {pick.shipped.engine}:
        raise CalibrationRefused(f"subset {subset!r} was scored by {', '.join(sorted(engines))}, not by "
                                 f"{pick.shipped.engine}, which decides on this host: calibrate where it was "
                                 f"screened")
    ids = table.column("image_id").to_pylist()
    scores = table.column("score").to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    first = np.array([in_calibration_half(i) for i in ids], dtype=bool)
    halves = {name: {"images": int(mask.sum()), "positives": int(labels[mask].sum())}
              for name, mask in (("calibration", first), ("verification", ~first))}
    key = content_key("calibrate/v1", version, manifest.seal, subset, plan.runs, asdict(rule), sided)
    result = SiteCalibration(f"{version}-{safe_name(subset, 'subset')}-{key[:12]}", version, subset,
                             pick.shipped.engine, pick.shipped.file, float(pick.shipped.threshold), {}, halves, {}, {},
                             datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if halves["calibration"]["positives"] == 0:
        result.refused = (f"the calibration half of {subset!r} holds no positives; the rule needs ≥ "
                          f"{rule_needs(rule)} there, so the subset needs about {2 * rule_needs(rule)} labelled "
                          f"positives")
        return result
    chosen = calibrate(scores[first], labels[first], rule)
    result.calibration = chosen.as_dict()
    result.verification = _figures_at(scores[~first], labels[~first], chosen.threshold, rule.target, sided)
    result.verification_at_shipped = _figures_at(scores[~first], labels[~first], result.shipped_threshold,
                                                 rule.target, sided)
    total = int(labels.sum())
    if not chosen.guaranteed:
        result.refused = (f"the calibration half of {subset!r} holds {halves['calibration']['positives']} positives; "
                          f"the rule (sensitivity ≥ {rule.target:.0%} with probability ≥ {1 - rule.delta:.0%}) needs "
                          f"≥ {chosen.positives_needed} there, so the subset needs about {2 * chosen.positives_needed} "
                          f"labelled positives (it has {total})")
    elif result.verification["sensitivity"] < rule.target:
        result.refused = (f"on the verification half of {subset!r} the new threshold {chosen.threshold:.4f} finds "
                          f"{result.verification['tp']}/{result.verification['positives']} positives "
                          f"({result.verification['sensitivity']:.4f}), below the target {rule.target}")
    result.elsewhere = _other_subsets(lake, version, subset, chosen.threshold, rule.target, sided)
    failing = {name: f for name, f in result.elsewhere.items() if f["sensitivity"] < rule.target}
    if failing and not result.refused:
        said = "; ".join(f"{name!r} {f['tp']}/{f['positives']} ({f['sensitivity']:.4f})" for name, f in failing.items())
        result.refused = (f"at {chosen.threshold:.4f} this lake's other labelled subset(s) fall below the target "
                          f"{rule.target}: {said}. One threshold decides every image in the lake, so a site "
                          f"threshold belongs in a lake of that site's images (copy lake/models/ into it and ingest "
                          f"the site's shards there)")
    return result


def _other_subsets(lake: Lake, version: str, subset: str, threshold: float, target: float, sided: str) -> dict:
    """Figures of every other labelled subset with positives at `threshold` (their current predictions)."""
    names = sorted(set(labelled_subsets(lake).column("subset").to_pylist()) - {subset})
    if not names:
        return {}
    table = labelled_scores(plan_audit(lake, version, subsets=names, batch=[], sided=sided))
    out = {}
    for name in names:
        rows = table.filter(pc.equal(table.column("subset"), name))
        labels = rows.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
        if labels.sum():
            out[name] = _figures_at(rows.column("score").to_numpy(zero_copy_only=False), labels, threshold, target,
                                    sided)
    return out


def rule_needs(rule: ThresholdRule) -> int:
    return pac_positives_needed(rule.target, rule.delta)


def record_file(lake: Lake, calibration_id: str) -> Path:
    return lake.calibration_file(calibration_id)


def save(lake: Lake, result: SiteCalibration) -> SiteCalibration:
    """Keep the calibration (applied or not, refused or not) in the lake."""
    path = record_file(lake, result.calibration_id)
    result.record_file = str(path)
    atomic_write_bytes(path, json.dumps(asdict(result), indent=2, default=float).encode())
    return result


def apply(lake: Lake, result: SiteCalibration) -> Manifest:
    """Record the site point in the version's manifest (signed again) so that screening decides with it."""
    if result.refused:
        raise CalibrationRefused(result.refused)
    registry = Registry(lake)
    point_record = {"name": result.name, "threshold": result.threshold, "subset": result.subset,
                    "calibration_id": result.calibration_id, "rule": result.calibration, "halves": result.halves,
                    "verification": {k: result.verification[k] for k in (
                        "n", "positives", "tp", "fn", "tn", "fp", "sensitivity", "sensitivity_cp_low",
                        "sensitivity_cp_high", "specificity", "specificity_cp_low", "specificity_cp_high",
                        "normals_flagged_per_1000", "claim")},
                    "shipped_threshold": result.shipped_threshold,
                    "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return registry.update_sealed(result.version, lambda m: _with_point(m, point_key(result.engine, result.file),
                                                                          point_record))


def reset(lake: Lake, version: str | None = None, engine: str = "auto") -> Manifest:
    """Remove the site point of the version's engine on this host: the shipped threshold decides again."""
    registry = Registry(lake)
    pick = registry.pick(version, engine)
    key = point_key(pick.shipped.engine, pick.shipped.file)
    return registry.update_sealed(pick.version, lambda m: _with_point(m, key, None))


def _with_point(manifest: Manifest, key: str, record: dict[str, Any] | None) -> None:
    points = manifest.site_operating_points
    if record is None:
        if key not in points:
            raise CalibrationRefused(f"no site operating point for {key}: the shipped threshold decides already")
        removed = points.pop(key)
        manifest.operating_point_history.append({"reset": removed["name"], "key": key,
                                                 "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    else:
        points[key] = record
        manifest.operating_point_history.append({"applied": record["name"], "key": key,
                                                 "calibration_id": record["calibration_id"],
                                                 "threshold": record["threshold"], "at": record["applied_at"]})


# --- Prefect wrappers ----------------------------------------------------------------------------------------------


@task(name="site-calibration", **IO_RETRIES)
def site_calibration_task(lake_root: str, subset: str, version: str | None, engine: str, delta: float | None,
                          sided: str) -> SiteCalibration:
    """Choose on the calibration half, verify on the other, keep the record."""
    lake = Lake.at(lake_root)
    return save(lake, site_calibration(lake, subset, version, engine, delta, sided))


@task(name="apply-site-point", **IO_RETRIES)
def apply_task(lake_root: str, result: SiteCalibration) -> SiteCalibration:
    """Record the site point in the manifest, signed again."""
    lake = Lake.at(lake_root)
    apply(lake, result)
    result.applied = True
    return save(lake, result)
