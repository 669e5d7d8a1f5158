"""The `audit` flow end to end: figures on a labelled subset, the report, a failing audit, drift, idempotence."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from session_env import ENV
from helpers import images, labelled_lake_with_model, task_states
from PIL import Image

from flows.audit import audit
from flows.ingest import ingest
from flows.screen import screen
from tasks.audit import AuditFailed
from tasks.metrics import clopper_pearson, wilson
from tasks.samples import SITES, Site, generate, write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")

DIM = Site("dim", gain=0.6, bias=40.0, noise=5.0, blur=0.8)  # an exposure change: scores move


@pytest.fixture(scope="module")
def audited_lake(tmp_path_factory):
    """A lake with a labelled hold-out subset (≥ 183 positives), an unshifted night shard and a dimmer one, all
    screened by a hand-made spot detector whose threshold is calibrated on the hold-out to find every positive."""
    root = tmp_path_factory.mktemp("audit")
    lake = root / "lake"
    hold_x, hold_y = images(400, "holdout", prevalence=0.5)
    write_tar(root / "holdout" / "hold-a.tar", hold_x, hold_y, prefix="hold")
    write_tar(root / "nights" / "night-a.tar", generate(300, 0.1, 7, SITES["a"], "night")[0], None, prefix="na")
    write_tar(root / "nights" / "night-dim.tar", generate(300, 0.1, 7, DIM, "night")[0], None, prefix="nd")
    held, threshold = labelled_lake_with_model(lake, root / "holdout", hold_x, hold_y)
    nights = ingest([str(root / "nights")], lake=str(lake))
    ids = {Path(s.shard).name: s.shard_id for s in held.shards + nights.shards}
    screen(lake=str(lake))
    return lake, ids, threshold, int(hold_y.sum())


def test_audit_reports_each_subset_and_shard_with_both_intervals(audited_lake):
    lake, ids, threshold, positives = audited_lake
    report = audit(lake=str(lake), batch=[ids["night-a.tar"]])
    assert report.passed and report.verdict == "passed"
    (subset,) = report.summary.subsets
    assert subset["subset"] == "holdout" and subset["positives"] == positives and subset["n"] == 400
    assert subset["sensitivity"] >= 0.98 and subset["threshold"] == pytest.approx(threshold)
    tp, pos = subset["tp"], subset["positives"]
    assert (subset["sensitivity_cp_low"], subset["sensitivity_cp_high"]) == pytest.approx(clopper_pearson(tp, pos))
    assert (subset["sensitivity_wilson_low"], subset["sensitivity_wilson_high"]) == pytest.approx(wilson(tp, pos))
    assert subset["sensitivity_cp_low"] < subset["sensitivity"] <= subset["sensitivity_cp_high"]
    assert positives >= 183 and subset["fn"] == 0 and subset["sensitivity_cp_low"] >= 0.98
    assert subset["verdict"] == "passed" and subset["claim"].startswith("supports sensitivity ≥ 98%")
    rows = pq.read_table(lake / "audits" / "figures").to_pylist()
    assert {(r["group_kind"], r["group"]) for r in rows} == {("subset", "all"), ("shard", "hold-a.tar")}
    assert {r["model_version"] for r in rows} == {"sn-spot"}


def test_the_report_is_one_html_file_with_its_plots_inline(audited_lake):
    lake, ids, _, _ = audited_lake
    report = audit(lake=str(lake), batch=[ids["night-a.tar"]])
    page = Path(report.report).read_text()
    assert Path(report.report).parent == lake / "audits" / "reports"
    assert "PASSED" in page and "Wilson 95% CI" in page and "exact 95% CI" in page and "hold-a.tar" in page
    assert "holdout: operating curve" in page and "chosen on these images themselves" in page
    assert "lower end of the two-sided 95% interval: a one-sided 97.5% bound" in page and "183 positives" in page
    plots = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(plots) == 2  # ROC + PR + histograms for the one subset, and the drift plot
    for plot in plots:
        width, height = Image.open(io.BytesIO(base64.b64decode(plot))).size
        assert width > 600 and height > 200
    assert "src=\"http" not in page and "<script" not in page  # self-contained


def test_drift_is_flagged_on_a_dimmer_batch_and_not_on_an_unshifted_one(audited_lake):
    lake, ids, _, _ = audited_lake
    calm = audit(lake=str(lake), batch=[ids["night-a.tar"]]).summary
    moved = audit(lake=str(lake), batch=[ids["night-dim.tar"]]).summary
    drift = pq.read_table(lake / "audits" / "drift").to_pylist()
    assert {d["audit_id"] for d in drift} >= {calm.audit_id, moved.audit_id}
    calm_row = next(d for d in drift if d["audit_id"] == calm.audit_id)
    moved_row = next(d for d in drift if d["audit_id"] == moved.audit_id)
    assert calm_row["reference"] == "validation" and calm_row["reference_n"] == 600 and calm_row["batch_n"] == 300
    assert not calm_row["flagged"] and moved_row["flagged"]
    assert "score distribution shifted" in moved_row["why"]
    assert "Drift: FLAGGED" in Path(lake / "audits" / "reports" / f"{moved.audit_id}.html").read_text()


def test_a_threshold_forced_too_high_fails_the_audit_and_keeps_the_predictions(audited_lake):
    lake, ids, _, _ = audited_lake
    before = sorted(p.name for p in (lake / "predictions" / "sn-spot").glob("*.parquet"))
    state = audit(lake=str(lake), batch=[ids["night-a.tar"]], threshold=0.999, return_state=True)
    assert state.is_failed()
    with pytest.raises(AuditFailed) as failure:
        state.result()
    message = str(failure.value)
    assert "subset 'holdout'" in message and "below the target 0.98 at threshold 0.9990" in message
    assert "predictions stay in the lake" in message and "screenline optimize" in message
    report = re.search(r"Read the report \(([^)]+)\)", message).group(1)
    assert "FAILED" in Path(report).read_text()
    assert sorted(p.name for p in (lake / "predictions" / "sn-spot").glob("*.parquet")) == before


def test_auditing_unchanged_predictions_again_writes_nothing_new(audited_lake):
    lake, ids, _, _ = audited_lake
    first = audit(lake=str(lake), batch=[ids["night-a.tar"]])
    files = sorted(p for p in (lake / "audits").rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    state = audit(lake=str(lake), batch=[ids["night-a.tar"]], return_state=True)
    assert state.result().summary.audit_id == first.summary.audit_id
    assert {"audit-figures:Cached", "audit-drift:Cached", "audit-report:Cached"} <= set(task_states(state))
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert sorted(p for p in (lake / "audits").rglob("*") if p.is_file()) == files


def test_a_subset_that_does_not_exist_is_a_clear_error(audited_lake):
    lake, _, _, _ = audited_lake
    with pytest.raises(ValueError, match=r"no labelled images in subset\(s\) nope .*subsets here: holdout"):
        audit(lake=str(lake), subsets=["nope"])


def test_the_default_batch_is_the_newest_screen_run(audited_lake):
    lake, _, _, _ = audited_lake
    summary = audit(lake=str(lake)).summary
    assert summary.drift["batch_n"] == 1000  # one screen run scored all three shards
    assert np.isfinite(summary.drift["ks_statistic"])


def test_the_cli_prints_the_figures_and_exits_non_zero_on_a_failed_audit(audited_lake):
    lake, ids, _, _ = audited_lake
    cli = [sys.executable, "-m", "screenline.cli", "audit", "--lake", str(lake), "--batch", ids["night-a.tar"]]
    passed = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert passed.returncode == 0, passed.stderr
    assert "holdout (passed): 400 images" in passed.stdout and "two-sided 95% CI: exact" in passed.stdout
    assert "report: " in passed.stdout
    failed = subprocess.run([*cli, "--threshold", "0.999"], env=ENV, capture_output=True, text=True, timeout=300,
                            check=False)
    assert failed.returncode == 2
    assert "screenline: error: audit of sn-spot failed: subset 'holdout'" in failed.stderr


# --- a subset that cannot show the target never reads as a pass -----------------------------------------------------


@pytest.fixture(scope="module")
def thin_lake(tmp_path_factory):
    """A lake with a subset of negatives only and a subset of 30 positives, screened by the spot detector."""
    from helpers import register_model, spot_detector

    root = tmp_path_factory.mktemp("thin")
    lake = root / "lake"
    negatives = generate(40, 0.0, 7, SITES["a"], "negatives")[0]
    write_tar(root / "neg" / "neg.tar", negatives, np.zeros(40, np.uint8), prefix="neg")
    few_x, few_y = images(60, "few", prevalence=0.5)
    write_tar(root / "few" / "few.tar", few_x, few_y, prefix="few")
    ingest([str(root / "neg")], lake=str(lake), subset="negatives")
    ingest([str(root / "few")], lake=str(lake), subset="few")
    register_model(lake, "sn-thin", seed=0, threshold=0.0, model=spot_detector())  # flags every image
    screen(lake=str(lake))
    return lake


def test_a_subset_without_positives_is_inconclusive_never_passed(thin_lake):
    report = audit(lake=str(thin_lake), subsets=["negatives"])
    assert report.verdict == "inconclusive" and not report.passed
    (row,) = report.summary.subsets
    assert row["positives"] == 0 and row["verdict"] == "inconclusive" and np.isnan(row["sensitivity"])
    assert "no positives: sensitivity cannot be estimated" in report.summary.inconclusive[0]
    page = Path(report.report).read_text()
    assert "INCONCLUSIVE" in page and "PASSED" not in page


def test_a_subset_whose_positives_cannot_show_the_target_is_inconclusive(thin_lake):
    report = audit(lake=str(thin_lake), subsets=["few"])
    (row,) = report.summary.subsets
    assert row["sensitivity"] == 1.0 and row["positives"] < 183  # every positive found, too few to show 98%
    assert report.verdict == "inconclusive" and row["verdict"] == "inconclusive"
    both = audit(lake=str(thin_lake))
    assert both.verdict == "inconclusive" and {r["verdict"] for r in both.summary.subsets} == {"inconclusive"}


def test_the_cli_exits_3_when_the_target_is_not_shown(thin_lake):
    cli = [sys.executable, "-m", "screenline.cli", "audit", "--lake", str(thin_lake), "--subset", "negatives"]
    done = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 3, done.stderr
    assert "INCONCLUSIVE" in done.stdout and "sensitivity n/a" in done.stdout
    assert "screenline: audit inconclusive: the sensitivity target is not shown" in done.stderr


def test_a_lake_without_labelled_subsets_is_not_audited_not_passed(tmp_path):
    from helpers import register_model

    write_tar(tmp_path / "night" / "n.tar", generate(30, 0.1, 7, SITES["a"], "unlabelled")[0], None, prefix="n")
    ingest([str(tmp_path / "night")], lake=str(tmp_path / "lake"))
    register_model(tmp_path / "lake", "sn-none", seed=0)
    screen(lake=str(tmp_path / "lake"))
    report = audit(lake=str(tmp_path / "lake"))
    assert report.verdict == "not audited" and not report.passed
    assert "NOT AUDITED" in Path(report.report).read_text()


def test_a_one_sided_claim_says_so_and_needs_fewer_positives(thin_lake, tmp_path):
    """A subset of 160 positives, all found: not enough for the two-sided interval's end, enough one-sided."""
    from helpers import register_model, spot_detector

    x, y = images(320, "one-sided", prevalence=0.5)
    write_tar(tmp_path / "s" / "s.tar", x, y, prefix="os")
    ingest([str(tmp_path / "s")], lake=str(tmp_path / "lake"), subset="site")
    register_model(tmp_path / "lake", "sn-one", seed=0, threshold=0.0, model=spot_detector())
    screen(lake=str(tmp_path / "lake"))
    positives = int(y.sum())
    assert 149 <= positives < 183
    two = audit(lake=str(tmp_path / "lake"))
    one = audit(lake=str(tmp_path / "lake"), one_sided=True)
    assert two.verdict == "inconclusive" and one.verdict == "passed"
    assert "exact one-sided 95% lower bound" in one.summary.subsets[0]["claim"]
    assert "149 positives for 98%" in Path(one.report).read_text()
