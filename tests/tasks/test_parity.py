"""Non-inferiority at matched sensitivity: the figures, the paired bootstrap, the verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.parity import matched_specificity, noninferiority, partial_specificity


def scored(n: int = 3000, separation: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.1).astype(np.int8)
    return labels * separation + rng.normal(size=n), labels


def test_matched_specificity_reads_the_threshold_on_the_positive_the_target_allows_to_miss():
    labels = np.array([1] * 100 + [0] * 10)
    scores = np.concatenate([np.arange(100) + 10.0, np.arange(10) + 0.5])  # positives 10…109, negatives 0.5…9.5
    assert matched_specificity(scores, labels, 0.98) == 1.0  # threshold 12: 98 of 100 flagged, no negative
    scores[100:] = [11.5] * 4 + [1.0] * 6  # four negatives between the 2nd and 3rd lowest positive
    assert matched_specificity(scores, labels, 0.98) == 1.0  # threshold 12: above them
    assert matched_specificity(scores, labels, 0.99) == pytest.approx(0.6)  # threshold 11: they are flagged
    # the mean over sensitivity 100%, 99%, 98% (thresholds 10, 11, 12)
    assert partial_specificity(scores, labels, 0.98) == pytest.approx((0.6 + 0.6 + 1.0) / 3)


def test_identical_models_pass_with_a_zero_difference():
    scores, labels = scored()
    result = noninferiority(scores, scores.copy(), labels, 0.98, margin=0.03)
    assert result["passes"] and result["difference"] == 0.0 and result["interval"] == [0.0, 0.0]


def test_a_weaker_candidate_is_refused_with_the_difference_and_its_interval():
    strong, labels = scored(separation=4.0)
    rng = np.random.default_rng(5)
    weak = strong * 0.4 + rng.normal(size=len(strong)) * 1.5  # the same images, much noisier
    result = noninferiority(weak, strong, labels, 0.98, margin=0.03)
    assert not result["passes"]
    low, high = result["interval"]
    assert low < result["difference"] < high and high < 0  # clearly worse, the interval says so
    assert result["difference"] == pytest.approx(result["candidate_specificity"] - result["baseline_specificity"])
    assert f"{result['difference']:+.4f}" in result["statement"] and f"{low:+.4f}" in result["statement"]
    assert "NOT non-inferior" in result["statement"] and result["verdict"] == "inferior"


def test_too_few_positives_to_tell_is_inconclusive_and_says_how_many_would_do():
    base, labels = scored(separation=3.0, seed=4)
    close = base + np.random.default_rng(6).normal(size=len(base)) * 0.15  # about as good, not the same
    result = noninferiority(close, base, labels, 0.98, margin=0.03)
    low, high = result["interval"]
    assert low < -0.03 < high and result["verdict"] == "inconclusive" and not result["passes"]
    assert -0.03 < result["difference"] < 0 and result["positives_needed"] > result["positives"]
    assert f"about {result['positives_needed']:,} positives" in result["statement"]
    worse = base + np.random.default_rng(6).normal(size=len(base)) * 0.3  # below the margin at its point estimate
    result = noninferiority(worse, base, labels, 0.98, margin=0.03)
    assert result["verdict"] == "inconclusive" and result["difference"] < -0.03 and result["positives_needed"] is None
    assert "no number of positives would show it" in result["statement"]


def test_a_better_candidate_passes_and_a_margin_moves_the_verdict():
    base, labels = scored(separation=3.0, seed=1)
    better = base + labels * 1.0  # the same images, each positive pushed further up
    assert noninferiority(better, base, labels, 0.98)["passes"]
    close = base - labels * 0.3  # slightly worse: refused at a 0 margin, accepted at a generous one
    assert not noninferiority(close, base, labels, 0.98, margin=0.0)["passes"]
    assert noninferiority(close, base, labels, 0.98, margin=0.5)["passes"]


def test_the_paired_bootstrap_is_deterministic_under_its_seed():
    a, labels = scored(seed=2)
    b = a + np.random.default_rng(3).normal(size=len(a)) * 0.5
    first, again = noninferiority(a, b, labels, 0.98, seed=11), noninferiority(a, b, labels, 0.98, seed=11)
    other = noninferiority(a, b, labels, 0.98, seed=12)
    assert first["interval"] == again["interval"]
    assert first["interval"] != other["interval"] and first["difference"] == other["difference"]


def test_unpaired_scores_are_refused():
    a, labels = scored()
    with pytest.raises(ValueError, match="same images"):
        noninferiority(a, a[:-1], labels, 0.98)
