"""Intervals and 2×2 tables on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.metrics import clopper_pearson, table_at, wilson


def test_intervals_match_known_values():
    lo, hi = clopper_pearson(183, 183)
    assert lo == pytest.approx(0.98005, abs=1e-4) and hi == 1.0
    lo, hi = clopper_pearson(9, 10)
    assert (lo, hi) == pytest.approx((0.5550, 0.9975), abs=1e-4)
    lo, hi = wilson(9, 10)
    assert (lo, hi) == pytest.approx((0.5958, 0.9821), abs=1e-4)


@pytest.mark.parametrize("k, n", [(183, 183), (298, 300), (45, 50), (1, 10), (0, 10), (150, 150)])
def test_exact_lower_bounds_agree_with_scipys_binomial_test(k, n):
    from scipy.stats import binomtest

    from tasks.metrics import exact_lower_bound

    two = binomtest(k, n, alternative="two-sided").proportion_ci(0.95, method="exact").low
    one = binomtest(k, n, alternative="greater").proportion_ci(0.95, method="exact").low
    assert exact_lower_bound(k, n, 0.95, "two") == pytest.approx(two, abs=1e-9)
    assert exact_lower_bound(k, n, 0.95, "one") == pytest.approx(one, abs=1e-9)
    assert exact_lower_bound(k, n, 0.95, "one") >= exact_lower_bound(k, n, 0.95, "two")


def test_a_claim_names_its_bound_and_one_sided_needs_fewer_positives():
    from tasks.metrics import claim, figures, positives_needed

    assert positives_needed(0.98, sided="two") == 183 and positives_needed(0.98, sided="one") == 149
    f = figures(np.array([0.9] * 160), np.ones(160), 0.5)  # 160 of 160 found
    two, _, sentence_two = claim(f, 0.98, sided="two")
    one, _, sentence_one = claim(f, 0.98, sided="one")
    assert not two and "two-sided 95% interval: a one-sided 97.5% bound" in sentence_two
    assert one and "exact one-sided 95% lower bound" in sentence_one
