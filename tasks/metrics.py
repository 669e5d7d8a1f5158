"""Screening figures from scores and labels: the threshold for a sensitivity target, 2×2 tables, intervals, AUC.

Plain numpy/scipy functions, shared by optimize (calibration, gates) and audit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The highest threshold t such that sensitivity of (score >= t) is at least `target`.

    With n positives, at most floor(n·(1 - target)) of them may score below t, so t is the positive score at that
    rank. Raises ValueError when there is no positive to calibrate on.
    """
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 1])
    if len(positives) == 0:
        raise ValueError("cannot calibrate a threshold without positives in the calibration split")
    allowed_misses = math.floor(len(positives) * (1.0 - target) + 1e-9)
    return float(positives[allowed_misses])


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


def table_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Table2x2:
    """The 2×2 table of (score >= threshold) against labels."""
    predicted = np.asarray(scores) >= threshold
    labels = np.asarray(labels) == 1
    return Table2x2(float(threshold), int((predicted & labels).sum()), int((~predicted & labels).sum()),
                    int((~predicted & ~labels).sum()), int((predicted & ~labels).sum()))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (nan when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min(initial=0) == labels.max(initial=0):
        return float("nan")
    return float(roc_auc_score(labels, scores))
