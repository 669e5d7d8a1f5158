"""Audit figures on hand-made 2×2 tables, the positives a claim needs, and the drift check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.audit import AuditIncomplete, DriftSettings, audit_figures, drift_check, plan_audit, subset_verdict
from tasks.metrics import claim, figures, positives_needed


def table(tp: int, fn: int, tn: int, fp: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels whose 2×2 table at threshold 0.5 is exactly (tp, fn, tn, fp)."""
    scores = np.array([0.9] * tp + [0.1] * fn + [0.1] * tn + [0.9] * fp)
    labels = np.array([1] * (tp + fn) + [0] * (tn + fp))
    return scores, labels


def test_figures_of_a_hand_made_table():
    # 45/50 positives found, 90/100 negatives cleared. Expected intervals from the binomial definition (Clopper-
    # Pearson solved on the binomial tails, Wilson in closed form), as published for 45/50: 0.782–0.967.
    f = figures(*table(45, 5, 90, 10), threshold=0.5)
    assert (f.n, f.positives, f.negatives, f.tp, f.fn, f.tn, f.fp) == (150, 50, 100, 45, 5, 90, 10)
    assert f.sensitivity == 0.9 and f.specificity == 0.9
    assert (f.sensitivity_cp_low, f.sensitivity_cp_high) == pytest.approx((0.78186, 0.96672), abs=1e-5)
    assert (f.sensitivity_wilson_low, f.sensitivity_wilson_high) == pytest.approx((0.78640, 0.95652), abs=1e-5)
    assert (f.specificity_cp_low, f.specificity_cp_high) == pytest.approx((0.82378, 0.95100), abs=1e-5)
    assert (f.specificity_wilson_low, f.specificity_wilson_high) == pytest.approx((0.82563, 0.94477), abs=1e-5)
    assert f.ppv == pytest.approx(45 / 55) and f.npv == pytest.approx(90 / 95)
    assert f.auc == pytest.approx(0.9 * 0.9 + 0.5 * (0.9 * 0.1 + 0.1 * 0.9))  # ties count half


def test_a_table_without_positives_has_no_sensitivity():
    f = figures(*table(0, 0, 20, 3), threshold=0.5)
    assert math.isnan(f.sensitivity) and math.isnan(f.auc) and f.ppv == 0.0 and f.npv == 1.0
    assert (f.sensitivity_cp_low, f.sensitivity_cp_high) == (0.0, 1.0)
    supported, needed, sentence = claim(f, 0.98)
    assert not supported and needed == 183 and "no positives" in sentence


def test_183_positives_without_a_miss_are_the_fewest_that_support_98_percent():
    assert positives_needed(0.98) == 183
    assert positives_needed(0.95) == 72
    assert positives_needed(0.98, misses=1) == 277
    supported, _, sentence = claim(figures(*table(183, 0, 10, 0), 0.5), 0.98)
    assert supported and "0.9800" in sentence
    supported, needed, sentence = claim(figures(*table(182, 0, 10, 0), 0.5), 0.98)
    assert not supported and needed == 183 and "≥ 183 positives with no miss" in sentence
    supported, needed, sentence = claim(figures(*table(199, 1, 10, 0), 0.5), 0.98)
    assert not supported and needed == 277 and "≥ 277 with 1 miss(es)" in sentence


def test_drift_is_flagged_on_a_shifted_batch_and_not_on_a_resample():
    rng = np.random.default_rng(0)
    reference = rng.beta(1, 6, 4000)
    same = rng.beta(1, 6, 1500)
    shifted = rng.beta(2, 5, 1500)
    calm = drift_check(same, reference, threshold=0.3)
    assert not calm["flagged"] and calm["why"].startswith("no drift")
    moved = drift_check(shifted, reference, threshold=0.3)
    assert moved["flagged"] and "score distribution shifted" in moved["why"] and "positive rate" in moved["why"]
    assert moved["batch_positive_rate"] > moved["reference_positive_rate"]


def test_a_tiny_significant_shift_is_not_drift_but_a_rate_jump_is():
    rng = np.random.default_rng(1)
    reference = rng.normal(0.3, 0.1, 200_000)
    nudged = rng.normal(0.31, 0.1, 200_000)  # p ≈ 0 with this many scores, but the KS statistic is ~0.04
    result = drift_check(nudged, reference, threshold=0.5)
    assert result["ks_pvalue"] < 1e-10 and not result["flagged"]
    assert drift_check(nudged, reference, 0.5, DriftSettings(min_ks_statistic=0.01))["flagged"]


def test_drift_without_a_reference_is_not_checked():
    result = drift_check(np.array([0.2, 0.3]), np.array([]), 0.5)
    assert not result["flagged"] and result["why"] == "not checked: no reference scores"


@pytest.mark.parametrize("tp, fn, verdict", [
    (0, 0, "inconclusive"),      # no positives: nothing shown
    (120, 0, "inconclusive"),    # all found, but 120 positives cannot reach a 98% lower bound
    (183, 0, "passed"),          # the fewest that can
    (298, 2, "inconclusive"),    # point estimate 0.993, exact lower bound 0.976
    (275, 1, "inconclusive"),    # 276 positives, one missed: one short of the 277 that one miss needs
    (276, 1, "passed"),
    (190, 10, "failed"),         # 0.95: below target whatever the interval
])
def test_a_subset_passes_only_when_its_positives_show_the_target(tp, fn, verdict):
    f = figures(*table(tp, fn, 50, 5), threshold=0.5)
    supported, _, _ = claim(f, 0.98)
    assert subset_verdict(f, 0.98, supported) == verdict


def test_figures_at_per_image_thresholds_count_the_decisions_as_made():
    scores = np.array([0.3, 0.3, 0.6, 0.6])
    labels = np.array([1, 1, 0, 0])
    f = figures(scores, labels, np.array([0.2, 0.4, 0.5, 0.7], np.float32))  # decided at 2 thresholds each
    assert (f.tp, f.fn, f.tn, f.fp) == (1, 1, 1, 1)


@pytest.fixture
def screened_subset(tmp_path):
    from helpers import images, register_model, screen_plain

    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.samples import write_tar
    from tasks.shards import fingerprint

    x, y = images(30, "coverage", prevalence=0.5)
    write_tar(tmp_path / "s.tar", x, y)
    lake = Lake(tmp_path / "lake")
    lake.ensure_channels(1)
    ingest_shard(fingerprint(tmp_path / "s.tar"), lake, IngestOptions(channels=1, subset="holdout"))
    register_model(lake.root, "sn-cov", seed=0, threshold=0.0)
    screen_plain(lake)
    return lake


def test_an_image_in_the_lake_twice_stops_the_audit_instead_of_counting_it_twice(screened_subset):
    """Only a lake altered outside screenline holds this; the audit must say so rather than report n = 60."""
    import shutil

    from helpers import screen_plain

    lake = screened_subset
    (original,) = lake.shard_files()
    shutil.copyfile(original, lake.images / "0000000000000000.parquet")
    screen_plain(lake)
    with pytest.raises(AuditIncomplete, match="appears more than once in the lake's images"):
        audit_figures(plan_audit(lake))


def test_predictions_that_change_after_planning_are_not_audited(screened_subset):
    from helpers import screen_plain

    lake = screened_subset
    plan = plan_audit(lake)
    assert audit_figures(plan).subsets[0]["n"] == 30
    (predicted,) = (lake.predictions / "sn-cov").glob("*.parquet")
    predicted.unlink()
    screen_plain(lake)  # scored again by another run: not what the plan read
    with pytest.raises(AuditIncomplete, match="changed since this audit was planned"):
        audit_figures(plan)


def test_a_subset_that_gated_the_versions_promotion_is_audited_but_not_called_an_independent_check(screened_subset):
    from models.registry import Registry

    lake = screened_subset
    plain = audit_figures(plan_audit(lake)).subsets[0]
    assert "not an independent check" not in plain["claim"]
    # as optimize --test-subset holdout records it
    Registry(lake).update_sealed("sn-cov", lambda m: m.data.update(test_subsets=["holdout"]))
    row = audit_figures(plan_audit(lake)).subsets[0]
    assert row["claim"].startswith("not an independent check: this subset was in the held-out test split that "
                                   "gated sn-cov's promotion (optimize --test-subset holdout); ")
    assert row["claim"].endswith(plain["claim"]) and row["verdict"] == plain["verdict"] and row["n"] == 30
