"""The `calibrate` flow: a site threshold chosen on half of a labelled local subset, verified on the other half, and
applied (signed into the manifest) only when asked and only when it holds up."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks.calibrate import CalibrationRefused, SiteCalibration, apply_task, site_calibration_task
from tasks.lake import lake_root


@flow(name="calibrate")
def calibrate(subset: str, lake: str | None = None, version: str | None = None, apply: bool = False,
              delta: float | None = None, engine: str = "auto", one_sided: bool = False) -> SiteCalibration:
    """Choose a site threshold for the version's engine on this host on the calibration half of `subset`, verify it
    on the other half, and with `apply` record it in the manifest so that screening decides with it.

    delta: the rule's, default the version's own. one_sided: the verification claim's bound, as for audit. Ends
    Failed (after keeping the record) when the subset cannot support a site threshold, saying how many positives it
    would need.
    """
    logger = get_run_logger()
    result = site_calibration_task(str(lake_root(lake)), subset, version, engine, delta,
                                   "one" if one_sided else "two")
    rows = [{"threshold": label, **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()
                                    if k in ("threshold", "tp", "fn", "tn", "fp", "sensitivity", "sensitivity_cp_low",
                                             "sensitivity_cp_high", "specificity", "specificity_cp_low",
                                             "specificity_cp_high", "normals_flagged_per_1000")}}
            for label, figures in (("site (new)", result.verification), ("shipped", result.verification_at_shipped))
            if figures]
    create_table_artifact(key="calibration", table=rows,
                          description=f"{result.calibration_id}: verification half of {subset!r} "
                                      f"({result.halves['verification']})")
    if result.refused:
        raise CalibrationRefused(f"{result.refused}; record {result.record_file}")
    logger.info("site threshold %.4f for %s on %r: %s", result.threshold, result.version, subset,
                result.calibration["statement"])
    if apply:
        result = apply_task(str(lake_root(lake)), result)
        logger.info("applied %s to %s: screening decides with it from the next screen", result.name, result.version)
    return result
