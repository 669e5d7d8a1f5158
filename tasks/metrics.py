"""Screening figures from scores and labels: 2×2 tables, intervals, AUC, and what a claim needs.

Plain numpy/scipy functions, shared by optimize (gates) and audit. Thresholds are chosen in tasks/thresholds.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval."""
    if n == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return (lo, hi)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval."""
    if n == 0:
        return (0.0, 1.0)
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Table2x2:
    """A 2×2 table at a threshold, with sensitivity/specificity and their exact 95% intervals."""

    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    def as_dict(self) -> dict:
        sens_ci = clopper_pearson(self.tp, self.tp + self.fn)
        spec_ci = clopper_pearson(self.tn, self.tn + self.fp)
        return {**asdict(self), "sensitivity": self.sensitivity, "sensitivity_ci95": list(sens_ci),
                "specificity": self.specificity, "specificity_ci95": list(spec_ci)}


def table_at(scores: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> Table2x2:
    """The 2×2 table of (score >= threshold) against labels; `threshold` is one number, or one per score (the
    decisions as they were made). The table's threshold is nan for a per-score threshold."""
    cut = np.asarray(threshold)
    predicted = np.asarray(scores) >= cut
    labels = np.asarray(labels) == 1
    return Table2x2(float(cut) if cut.ndim == 0 else float("nan"), int((predicted & labels).sum()),
                    int((~predicted & labels).sum()),
                    int((~predicted & ~labels).sum()), int((predicted & ~labels).sum()))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (nan when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


SIDES = ("two", "one")
"""A claim's lower bound: the lower end of the two-sided exact interval (default; at 95% it is a one-sided 97.5%
bound), or the one-sided exact bound at the stated confidence."""


def exact_lower_bound(successes: int, n: int, confidence: float = 0.95, sided: str = "two") -> float:
    """The exact (Clopper-Pearson) lower bound: of the two-sided interval at `confidence`, or one-sided."""
    if sided not in SIDES:
        raise ValueError(f"sided must be one of {SIDES}, got {sided!r}")
    if n == 0 or successes == 0:
        return 0.0
    alpha = (1.0 - confidence) / (2 if sided == "two" else 1)
    return float(stats.beta.ppf(alpha, successes, n - successes + 1))


def bound_name(confidence: float = 0.95, sided: str = "two") -> str:
    """How a claim names its bound, so no reader takes a two-sided interval's end for a one-sided bound."""
    if sided == "one":
        return f"exact one-sided {confidence:.0%} lower bound"
    return (f"exact {confidence:.0%} lower bound (the lower end of the two-sided {confidence:.0%} interval: a "
            f"one-sided {1 - (1 - confidence) / 2:.1%} bound)")


def positives_needed(target: float, misses: int = 0, confidence: float = 0.95, sided: str = "two") -> int:
    """The fewest positives, `misses` of them missed, whose exact lower bound on sensitivity reaches `target`.

    With no miss at 98% and two-sided 95% confidence this is 183: 0.025 ** (1/183) ≥ 0.98 (one-sided 95%: 149). The
    bound rises with n for a fixed number of misses, so the search doubles, then bisects.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")

    def enough(n: int) -> bool:
        return exact_lower_bound(n - misses, n, confidence, sided) >= target

    hi = max(misses + 1, 2)
    while not enough(hi):
        hi *= 2
    lo = max(misses, 1)  # `lo` positives are never enough (or are the floor)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


@dataclass
class Figures:
    """Everything an audit reports for one group of labelled images at one threshold."""

    n: int
    positives: int
    negatives: int
    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float
    sensitivity_cp_low: float
    sensitivity_cp_high: float
    sensitivity_wilson_low: float
    sensitivity_wilson_high: float
    specificity: float
    specificity_cp_low: float
    specificity_cp_high: float
    specificity_wilson_low: float
    specificity_wilson_high: float
    ppv: float
    npv: float
    auc: float


def figures(scores: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> Figures:
    """The 2×2 table at `threshold` (one, or one per score), sensitivity and specificity with exact (Clopper-Pearson)
    and Wilson two-sided 95% intervals, PPV, NPV and AUC. Ratios with an empty denominator are nan."""
    t = table_at(scores, labels, threshold)
    pos, neg = t.tp + t.fn, t.tn + t.fp

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return Figures(
        n=pos + neg, positives=pos, negatives=neg, tp=t.tp, fn=t.fn, tn=t.tn, fp=t.fp,
        sensitivity=ratio(t.tp, pos), sensitivity_cp_low=clopper_pearson(t.tp, pos)[0],
        sensitivity_cp_high=clopper_pearson(t.tp, pos)[1], sensitivity_wilson_low=wilson(t.tp, pos)[0],
        sensitivity_wilson_high=wilson(t.tp, pos)[1],
        specificity=ratio(t.tn, neg), specificity_cp_low=clopper_pearson(t.tn, neg)[0],
        specificity_cp_high=clopper_pearson(t.tn, neg)[1], specificity_wilson_low=wilson(t.tn, neg)[0],
        specificity_wilson_high=wilson(t.tn, neg)[1],
        ppv=ratio(t.tp, t.tp + t.fp), npv=ratio(t.tn, t.tn + t.fn), auc=auc(scores, labels),
    )


def claim(f: Figures, target: float, confidence: float = 0.95, sided: str = "two") -> tuple[bool, int, str]:
    """Whether these positives support sensitivity ≥ target at the exact lower bound (two-sided interval's end, or
    one-sided), how many positives (with the misses seen) that takes, and a sentence saying so and naming the bound."""
    needed_clean = positives_needed(target, 0, confidence, sided)
    bound = bound_name(confidence, sided)
    if f.positives == 0:
        return False, needed_clean, (f"no positives: sensitivity cannot be estimated; claiming {target:.0%} at the "
                                     f"{bound} needs ≥ {needed_clean} positives with no miss")
    low = exact_lower_bound(f.tp, f.positives, confidence, sided)
    if low >= target:
        return True, f.positives, (f"supports sensitivity ≥ {target:.0%}: {bound} {low:.4f} from "
                                   f"{f.tp}/{f.positives} positives found")
    needed = positives_needed(target, f.fn, confidence, sided)
    return False, needed, (
        f"too few positives to claim {target:.0%} at the {bound} ({low:.4f} from {f.tp}/{f.positives}): that needs "
        f"≥ {needed_clean} positives with no miss" + (f", or ≥ {needed} with {f.fn} miss(es)" if f.fn else "")
    )
