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
