"""Threshold calibration and intervals on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.metrics import calibrate_threshold, clopper_pearson, table_at, wilson


def test_threshold_is_the_highest_that_keeps_the_target():
    # 10 positives: at 0.9 one miss is allowed, so the threshold is the second-lowest positive score
    pos = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    neg = np.array([0.1, 0.15, 0.25, 0.6])
    scores = np.concatenate([pos, neg])
    labels = np.array([1] * 10 + [0] * 4)
    assert calibrate_threshold(scores, labels, 0.9) == 0.2
    assert calibrate_threshold(scores, labels, 0.95) == 0.05
    assert calibrate_threshold(scores, labels, 0.8) == 0.3
    table = table_at(scores, labels, 0.2)
    assert (table.tp, table.fn, table.tn, table.fp) == (9, 1, 2, 2)
    assert table.sensitivity == 0.9


def test_threshold_at_98_percent_of_100_positives():
    scores = np.arange(100) / 100
    labels = np.ones(100)
    assert calibrate_threshold(scores, labels, 0.98) == 0.02  # two misses allowed: 0.00 and 0.01


def test_no_positives_is_an_error():
    with pytest.raises(ValueError, match="without positives"):
        calibrate_threshold(np.array([0.1]), np.array([0]), 0.98)


def test_intervals_match_known_values():
    lo, hi = clopper_pearson(183, 183)
    assert lo == pytest.approx(0.98005, abs=1e-4) and hi == 1.0
    lo, hi = clopper_pearson(9, 10)
    assert (lo, hi) == pytest.approx((0.5550, 0.9975), abs=1e-4)
    lo, hi = wilson(9, 10)
    assert (lo, hi) == pytest.approx((0.5958, 0.9821), abs=1e-4)
