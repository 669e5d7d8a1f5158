"""Operating points: the rule that chooses a threshold from labelled scores, what it guarantees, and the curve.

The rule a clinician can read is `pac`: the highest threshold such that, with probability at least 1 − δ over the
images it was chosen on, sensitivity on new images from the same distribution is at least the target. With the n
calibration positives' scores sorted, s(1) ≤ … ≤ s(n), a new positive scores below s(k) with probability F(s(k)),
which is distributed as the k-th of n uniform order statistics; so P(sensitivity ≥ target) = P(Binomial(n,
1 − target) ≥ k), and the rule takes the largest k for which that is at least 1 − δ. It needs no assumption about the
scores but exchangeability (the calibration images and the new ones come from the same distribution), and ties
only make it more conservative. Few positives buy little: at 98% and δ = 0.05, k = 1 needs 149 positives, and k/n
approaches 2% only slowly (k = 3 of 380, 31 of 2,040), so the threshold sits below the 2% quantile by a margin that
shrinks as 1/√n. Below 149 positives no threshold carries the guarantee: the lowest positive score is used, and the
calibration says so (`guaranteed` false).

`quantile` is the rule screenline used before: the highest threshold whose sensitivity on the calibration images is
target + margin. It states no guarantee and is kept for comparison (benchmarks/operating_point.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from models.contract import TARGET_SENSITIVITY

RULES = ("pac", "quantile")
CURVE_SENSITIVITIES = (0.95, 0.97, 0.98, 0.99)
"""The sensitivities the operating curve is read at."""


@dataclass(frozen=True)
class ThresholdRule:
    """How a threshold is chosen: `pac` (sensitivity ≥ target with probability ≥ 1 − delta) or `quantile`
    (sensitivity target + margin on the calibration images, no guarantee)."""

    name: str = "pac"
    target: float = TARGET_SENSITIVITY
    delta: float = 0.05
    margin: float = 0.01  # quantile only

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"threshold rule must be one of {', '.join(RULES)}, got {self.name!r}")
        if not 0.0 < self.target < 1.0 or not 0.0 < self.delta < 1.0:
            raise ValueError(f"target and delta must be in (0, 1), got {self.target} and {self.delta}")


@dataclass(frozen=True)
class Calibration:
    """A threshold with what chose it and what it guarantees."""

    threshold: float
    rule: str
    target: float
    delta: float | None  # pac only
    positives: int  # calibration positives
    rank: int  # the threshold is the rank-th lowest calibration positive score
    guaranteed: bool  # pac: enough positives for the guarantee
    positives_needed: int  # pac: the fewest positives for which any threshold carries the guarantee
    statement: str  # what a clinician reads

    def as_dict(self) -> dict:
        return asdict(self)


def pac_rank(n: int, target: float, delta: float) -> int:
    """The largest k with P(Binomial(n, 1 − target) ≥ k) ≥ 1 − delta; 0 when even k = 1 falls short."""
    eps = 1.0 - target
    # P(Bin ≥ k) ≥ 1 − δ  ⟺  P(Bin ≤ k − 1) ≤ δ: k − 1 is the largest j whose CDF is at most δ
    j = int(stats.binom.ppf(delta, n, eps))
    while j >= 0 and stats.binom.cdf(j, n, eps) > delta:
        j -= 1
    while stats.binom.cdf(j + 1, n, eps) <= delta:
        j += 1
    return j + 1


def pac_positives_needed(target: float, delta: float) -> int:
    """The fewest positives for which the lowest of them carries the guarantee: target^n ≤ delta."""
    return math.ceil(math.log(delta) / math.log(target) - 1e-12)


def calibrate(scores: np.ndarray, labels: np.ndarray, rule: ThresholdRule = ThresholdRule()) -> Calibration:
    """The threshold `rule` chooses from these labelled scores; ValueError without positives."""
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 1])
    n = len(positives)
    if n == 0:
        raise ValueError("cannot calibrate a threshold without positives in the calibration images")
    if rule.name == "quantile":
        aim = min(1.0, rule.target + rule.margin)
        misses = math.floor(n * (1.0 - aim) + 1e-9)
        return Calibration(float(positives[misses]), "quantile", rule.target, None, n, misses + 1, False, 0,
                           f"sensitivity {aim:.1%} on the {n} calibration positives (no stated guarantee on new "
                           f"images)")
    needed = pac_positives_needed(rule.target, rule.delta)
    k = pac_rank(n, rule.target, rule.delta)
    if k == 0:
        return Calibration(float(positives[0]), "pac", rule.target, rule.delta, n, 1, False, needed,
                           f"no guarantee: {n} calibration positives are too few for sensitivity ≥ {rule.target:.0%} "
                           f"with probability ≥ {1 - rule.delta:.0%} (that needs ≥ {needed}); the lowest positive "
                           f"score is used")
    return Calibration(float(positives[k - 1]), "pac", rule.target, rule.delta, n, k, True, needed,
                       f"sensitivity ≥ {rule.target:.0%} on new images from the same distribution with probability "
                       f"≥ {1 - rule.delta:.0%} (the {ordinal(k)} lowest of {n} calibration positive scores)")


def ordinal(k: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def threshold_for_sensitivity(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these images is at least `sensitivity` (an empirical point, no
    guarantee: what the curve reads)."""
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 1])
    if len(positives) == 0:
        raise ValueError("no positives: the operating curve needs some")
    return float(positives[math.floor(len(positives) * (1.0 - sensitivity) + 1e-9)])


def point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity and normals flagged per 1,000 screened (at these images' prevalence) at
    `threshold`."""
    scores, labels = np.asarray(scores), np.asarray(labels) == 1
    flagged = scores >= threshold
    positives, negatives = int(labels.sum()), int((~labels).sum())
    fp = int((flagged & ~labels).sum())
    return {"threshold": float(threshold),
            "sensitivity": float((flagged & labels).sum() / positives) if positives else float("nan"),
            "specificity": float((~flagged & ~labels).sum() / negatives) if negatives else float("nan"),
            "normals_flagged_per_1000": 1000.0 * fp / len(scores) if len(scores) else float("nan")}


def operating_curve(scores: np.ndarray, labels: np.ndarray, shipped: float | None = None,
                    sensitivities: tuple[float, ...] = CURVE_SENSITIVITIES) -> list[dict]:
    """The best threshold on these images at each sensitivity, with its specificity and normals flagged per 1,000
    screened; and the shipped threshold's row (`at: "shipped"`) when given."""
    rows = [{"at": f"{s:.0%}", **point(scores, labels, threshold_for_sensitivity(scores, labels, s))}
            for s in sensitivities]
    if shipped is not None:
        rows.append({"at": "shipped", **point(scores, labels, shipped)})
    return rows


def in_calibration_half(image_id: str) -> bool:
    """Site calibration's halves (tasks/calibrate.py): from bits of the image id the train/val/test split does not
    use, so an image is always in the same half."""
    return int(image_id[16:24], 16) % 2 == 0


CURVE_COLUMNS = ("at sensitivity", "threshold", "sensitivity", "specificity", "normals flagged per 1,000 screened")


def curve_cells(row: dict) -> list[str]:
    """One operating-curve row as the text every renderer shows (CLI, artifacts, report)."""
    def ratio(value: float) -> str:
        return "n/a" if value != value else f"{value:.4f}"

    return [row["at"], f"{row['threshold']:.4f}", ratio(row["sensitivity"]), ratio(row["specificity"]),
            f"{row['normals_flagged_per_1000']:.0f}"]
