"""Site recalibration without Prefect: disjoint, stable halves; a threshold chosen on one half and verified on the
other; refusals that say how many positives it would take; an applied point that changes the decisions, names
itself in every prediction and keeps its provenance; an audit that judges that subset by its verification half."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import screen_plain, site_lake

from models.registry import Registry
from tasks.audit import audit_figures, plan_audit
from tasks.calibrate import CalibrationRefused, apply, reset, site_calibration
from tasks.lake import Lake
from tasks.thresholds import in_calibration_half


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Lake:
    return site_lake(tmp_path_factory.mktemp("big"), 2000)  # ~1,000 positives: ~500 a half, k ≈ 5 of them


def test_the_halves_are_disjoint_stable_and_even():
    ids = [f"{i:024x}" for i in range(0, 10 ** 6, 997)]
    first = [in_calibration_half(i) for i in ids]
    assert first == [in_calibration_half(i) for i in ids]  # the same image is always in the same half
    assert 0.4 < np.mean(first) < 0.6


def test_a_threshold_chosen_on_one_half_is_verified_on_the_other(big):
    result = site_calibration(big, "site")
    assert result.refused is None and result.name == "site:site"
    halves = result.halves
    table = pq.read_table(big.images, columns=["image_id", "label"]).to_pydict()
    first = [in_calibration_half(i) for i in table["image_id"]]
    assert halves["calibration"]["images"] == sum(first) and halves["verification"]["images"] == len(first) - sum(first)
    assert halves["calibration"]["positives"] == sum(lab for lab, f in zip(table["label"], first) if f) >= 149
    assert result.calibration["guaranteed"] and result.calibration["positives"] == halves["calibration"]["positives"]
    verification = result.verification
    assert verification["positives"] == halves["verification"]["positives"]  # figures from the other half only
    assert verification["sensitivity"] >= 0.98 and result.threshold > result.shipped_threshold
    assert verification["specificity"] > result.verification_at_shipped["specificity"] == 0.0
    assert verification["sensitivity_cp_low"] <= verification["sensitivity"] <= verification["sensitivity_cp_high"]
    assert verification["normals_flagged_per_1000"] < result.verification_at_shipped["normals_flagged_per_1000"]


def test_too_few_positives_are_refused_with_the_count_needed(tmp_path):
    lake = site_lake(tmp_path, 200, "small")  # ~100 positives: ~50 a half
    result = site_calibration(lake, "small")
    assert result.refused and "the rule (sensitivity ≥ 98% with probability ≥ 95%) needs ≥ 149 there" in result.refused
    assert "so the subset needs about 298 labelled positives" in result.refused
    with pytest.raises(CalibrationRefused, match="needs about 298"):
        apply(lake, result)
    assert not Registry(lake).manifest("sn-site").site_operating_points


def test_an_applied_point_changes_the_decisions_names_itself_and_keeps_its_provenance(big, tmp_path):
    import shutil

    lake = Lake(tmp_path / "lake")
    shutil.copytree(big.root, lake.root)
    before = pq.read_table(lake.predictions / "sn-site").to_pydict()
    result = site_calibration(lake, "site")
    apply(lake, result)
    manifest = Registry(lake).manifest("sn-site")  # still trusted: signed again
    (point,) = manifest.site_operating_points.values()
    assert point["name"] == "site:site" and point["subset"] == "site" and point["threshold"] == result.threshold
    assert point["calibration_id"] == result.calibration_id and point["halves"] == result.halves
    assert point["verification"]["sensitivity"] >= 0.98 and point["shipped_threshold"] == 0.0
    assert manifest.operating_point_history[-1]["applied"] == "site:site"
    assert set(screen_plain(lake).values()) == {"redecided"}
    after = pq.read_table(lake.predictions / "sn-site").to_pydict()
    assert set(after["operating_point"]) == {"site:site"} and set(after["threshold"]) == {np.float32(result.threshold)}
    assert sum(after["positive"]) < sum(before["positive"]) == len(before["positive"])
    assert after["score"] == before["score"]

    summary = audit_figures(plan_audit(lake))
    (row,) = summary.subsets
    assert row["operating_point"] == "site:site" and row["shipped_threshold"] == 0.0
    assert row["shipped_specificity"] == 0.0 and row["specificity"] > 0.4
    assert row["claim"].startswith("judged on its verification half only")
    halves = {r["group"]: r for r in pq.read_table(summary.figures_file).to_pylist() if r["group_kind"] == "half"}
    assert halves["verification half"]["positives"] == result.halves["verification"]["positives"]
    assert row["verdict"] == halves["verification half"]["verdict"]

    from tasks.audit import report_scores
    from tasks.report import render_report

    plan = plan_audit(lake)
    page = render_report(plan, audit_figures(plan), {"flagged": False, "why": "-", "batch_n": 0, "reference": "-",
                                                     "reference_n": 0}, report_scores(plan))
    assert "operating point site:site; shipped threshold 0.0000" in page and "specificity at shipped" in page
    assert "judged by its other (verification) half alone" in page

    reset(lake)
    manifest = Registry(lake).manifest("sn-site")
    assert not manifest.site_operating_points and manifest.operating_point_history[-1]["reset"] == "site:site"
    screen_plain(lake)
    assert set(pq.read_table(lake.predictions / "sn-site").column("operating_point").to_pylist()) == {"shipped"}


def test_a_site_threshold_that_would_fail_another_labelled_subset_of_the_lake_is_refused(big, tmp_path):
    """One threshold decides every image of a lake: a faint site's labelled images in the same lake would be missed
    at the clear site's threshold, so the calibration names them and nothing is applied."""
    import shutil

    from helpers import images

    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.samples import Site, write_tar
    from tasks.shards import fingerprint

    lake = Lake(tmp_path / "lake")
    shutil.copytree(big.root, lake.root)
    x, y = images(400, "calibrate-faint", site=Site("faint", lesion_scale=0.5), prevalence=0.5)
    write_tar(tmp_path / "faint.tar", x, y, prefix="faint")
    ingest_shard(fingerprint(tmp_path / "faint.tar"), lake, IngestOptions(channels=1, subset="faint"))
    screen_plain(lake)
    result = site_calibration(lake, "site")
    faint = result.elsewhere["faint"]
    assert faint["positives"] == int(y.sum()) and faint["sensitivity"] < 0.98
    assert result.verification["sensitivity"] >= 0.98  # the site's own figures hold; the lake's other images do not
    assert result.refused and "other labelled subset(s) fall below the target 0.98: 'faint'" in result.refused
    assert "a site threshold belongs in a lake of that site's images" in result.refused
    with pytest.raises(CalibrationRefused, match="'faint'"):
        apply(lake, result)
    assert not Registry(lake).manifest("sn-site").site_operating_points
