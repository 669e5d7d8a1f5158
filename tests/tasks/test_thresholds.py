"""Threshold rules on hand-made and simulated scores: exact thresholds, the PAC guarantee, the operating curve."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tasks.metrics import table_at
from tasks.thresholds import (
    ThresholdRule,
    calibrate,
    operating_curve,
    pac_positives_needed,
    pac_rank,
    threshold_for_sensitivity,
)


def test_the_empirical_threshold_is_the_highest_that_keeps_the_sensitivity():
    # 10 positives: at 0.9 one miss is allowed, so the threshold is the second-lowest positive score
    pos = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    neg = np.array([0.1, 0.15, 0.25, 0.6])
    scores = np.concatenate([pos, neg])
    labels = np.array([1] * 10 + [0] * 4)
    assert threshold_for_sensitivity(scores, labels, 0.9) == 0.2
    assert threshold_for_sensitivity(scores, labels, 0.95) == 0.05
    assert threshold_for_sensitivity(scores, labels, 0.8) == 0.3
    table = table_at(scores, labels, 0.2)
    assert (table.tp, table.fn, table.tn, table.fp) == (9, 1, 2, 2)
    assert threshold_for_sensitivity(np.arange(100) / 100, np.ones(100), 0.98) == 0.02  # 0.00 and 0.01 missed


def test_no_positives_is_an_error():
    with pytest.raises(ValueError, match="without positives"):
        calibrate(np.array([0.1]), np.array([0]))


@pytest.mark.parametrize("n, k", [(148, 0), (149, 1), (380, 3), (737, 9), (2040, 31)])
def test_the_pac_rank_is_the_largest_k_whose_binomial_tail_reaches_1_minus_delta(n, k):
    assert pac_rank(n, 0.98, 0.05) == k
    tail = stats.binom.sf(np.arange(k + 2) - 1, n, 0.02)  # P(Bin ≥ j) for j = 0 … k + 1
    assert (k == 0 or tail[k] >= 0.95) and tail[k + 1] < 0.95


def test_149_positives_are_the_fewest_that_carry_the_guarantee():
    assert pac_positives_needed(0.98, 0.05) == 149 and 0.98 ** 149 <= 0.05 < 0.98 ** 148
    few = calibrate(np.linspace(0.2, 0.9, 100), np.ones(100))
    assert not few.guaranteed and few.threshold == 0.2 and few.positives_needed == 149
    assert "too few for sensitivity ≥ 98% with probability ≥ 95% (that needs ≥ 149)" in few.statement


def test_the_pac_threshold_is_the_kth_lowest_positive_score():
    positives = np.arange(380) / 1000
    negatives = np.full(50, 0.001)
    scores = np.concatenate([positives[::-1], negatives])
    labels = np.array([1] * 380 + [0] * 50)
    cal = calibrate(scores, labels, ThresholdRule("pac", 0.98, 0.05))
    assert (cal.threshold, cal.rank, cal.positives, cal.guaranteed) == (0.002, 3, 380, True)
    assert cal.statement == ("sensitivity ≥ 98% on new images from the same distribution with probability ≥ 95% "
                             "(the 3rd lowest of 380 calibration positive scores)")
    old = calibrate(scores, labels, ThresholdRule("quantile", 0.98, margin=0.01))
    assert (old.threshold, old.rank, old.guaranteed) == (0.003, 4, False)


@pytest.mark.parametrize("n", [160, 380, 1000])
def test_over_many_draws_the_pac_threshold_keeps_the_target_with_probability_1_minus_delta(n):
    """True sensitivity of the chosen threshold, under a known score distribution (logit-normal positives)."""
    rng = np.random.default_rng(n)
    draws, target, delta = 3000, 0.98, 0.05
    logits = rng.normal(2.0, 1.5, size=(draws, n))
    rule = ThresholdRule("pac", target, delta)
    old = ThresholdRule("quantile", target, margin=0.01)
    kept = {"pac": 0, "quantile": 0}
    for row in logits:
        scores = 1 / (1 + np.exp(-row))
        for name, r in (("pac", rule), ("quantile", old)):
            t = calibrate(scores, np.ones(n), r).threshold
            true_sensitivity = stats.norm.sf(np.log(t / (1 - t)), 2.0, 1.5)
            kept[name] += true_sensitivity >= target
    assert kept["pac"] / draws >= 1 - delta - 0.01  # 3,000 draws: ±0.01 is > 2.5 standard errors
    assert kept["pac"] / draws >= stats.binom.sf(pac_rank(n, target, delta) - 1, n, 0.02) - 0.015
    if n == 380:  # the old rule, target + 1%, does not keep 98% with 95% probability at this n
        assert kept["quantile"] / draws < 0.95


def test_ties_make_the_rule_more_conservative_never_less():
    scores = np.repeat([0.1, 0.2, 0.3, 0.4, 0.5], 80)  # 400 positives on five levels
    cal = calibrate(scores, np.ones(400))
    assert cal.threshold == 0.1 and (scores >= cal.threshold).mean() == 1.0


def test_the_operating_curve_reads_each_sensitivity_and_marks_the_shipped_threshold():
    positives = np.linspace(0.01, 1.0, 100)
    negatives = np.linspace(0.0, 0.5, 900)
    scores = np.concatenate([positives, negatives])
    labels = np.array([1] * 100 + [0] * 900)
    curve = operating_curve(scores, labels, shipped=0.02)
    at = {row["at"]: row for row in curve}
    assert list(at) == ["95%", "97%", "98%", "99%", "shipped"]
    assert at["98%"]["threshold"] == positives[2] and at["98%"]["sensitivity"] == 0.98
    assert at["98%"]["specificity"] == pytest.approx(np.mean(negatives < positives[2]))
    assert at["shipped"]["normals_flagged_per_1000"] == pytest.approx(1000 * np.sum(negatives >= 0.02) / 1000)
    assert at["95%"]["specificity"] > at["99%"]["specificity"]
