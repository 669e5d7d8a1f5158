"""Clinical parity: a candidate against the model it replaces, at matched sensitivity, on the same images.

Matched sensitivity is the honest comparison: each model's specificity at its own threshold reaching the target
sensitivity on these images (its ROC read at the target), not both at one threshold and not two point estimates
from different data. Non-inferiority is judged by a paired, stratified bootstrap of the difference
(candidate − baseline): images are resampled, positives and negatives separately so each resample keeps the
prevalence, and the same resampled images score both models, so what the two share (the hard images) cancels. The
candidate passes when the lower end of the two-sided 95% percentile interval (a one-sided 97.5% lower bound) is no
lower than −margin. Deterministic under its seed.

Pure numpy: no torch, no Prefect.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP = 2000


def _rank(positives: int, target: float) -> int:
    """The index, in ascending order, of the positive score a threshold at `target` sensitivity sits on."""
    return math.floor(positives * (1.0 - target) + 1e-9)


def matched_specificity(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Specificity at the highest threshold whose sensitivity on these images is ≥ target (images scoring at the
    threshold are flagged, as screening flags them)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) == 1
    positives = np.sort(scores[labels])
    if len(positives) == 0 or labels.all():
        raise ValueError("matched specificity needs positives and negatives")
    return float(np.mean(scores[~labels] < positives[_rank(len(positives), target)]))


def partial_specificity(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The mean specificity over sensitivities from 1 down to `target` (the partial AUC over sensitivity ≥ target,
    normalised to 0…1): specificity at the threshold on each of the lowest positives the target allows to miss."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) == 1
    positives = np.sort(scores[labels])
    thresholds = positives[: _rank(len(positives), target) + 1]
    return float(np.mean(scores[~labels][:, None] < thresholds[None, :]))


def _bootstrap(pos: np.ndarray, neg: np.ndarray, pick_pos: np.ndarray, pick_neg: np.ndarray, target: float,
               partial: bool = False) -> np.ndarray:
    ordered = np.sort(pos[pick_pos], axis=1)
    rank = _rank(pick_pos.shape[1], target)
    if partial:
        return (neg[pick_neg][:, :, None] < ordered[:, None, : rank + 1]).mean(axis=(1, 2))
    return (neg[pick_neg] < ordered[:, rank][:, None]).mean(axis=1)


def bootstrap_sd(candidate: np.ndarray, baseline: np.ndarray, labels: np.ndarray, target: float,
                 partial: bool, resamples: int = 500, seed: int = 0) -> float:
    """The paired bootstrap's standard deviation of the difference (how steady a figure is: the ablation compares
    matched specificity with the partial one)."""
    labels = np.asarray(labels) == 1
    rng = np.random.default_rng(seed)
    c, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    pick_pos = rng.integers(0, labels.sum(), (resamples, labels.sum()))
    pick_neg = rng.integers(0, (~labels).sum(), (resamples, (~labels).sum()))
    d = (_bootstrap(c[labels], c[~labels], pick_pos, pick_neg, target, partial)
         - _bootstrap(b[labels], b[~labels], pick_pos, pick_neg, target, partial))
    return float(d.std())


def noninferiority(candidate: np.ndarray, baseline: np.ndarray, labels: np.ndarray, target: float,
                   margin: float = 0.03, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Specificity at `target` sensitivity (matched) of both models on the same images, the difference, its paired
    bootstrap interval, and whether the candidate is non-inferior by `margin`."""
    candidate, baseline = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    labels = np.asarray(labels) == 1
    if candidate.shape != baseline.shape or candidate.shape != labels.shape:
        raise ValueError(f"paired comparison needs the same images: {candidate.shape}, {baseline.shape}, "
                         f"{labels.shape}")
    spec_c = matched_specificity(candidate, labels, target)
    spec_b = matched_specificity(baseline, labels, target)
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    diffs = np.empty(resamples)
    for start in range(0, resamples, 250):  # in blocks: memory stays ~ 250 × negatives
        b = min(250, resamples - start)
        pick_pos, pick_neg = rng.integers(0, n_pos, (b, n_pos)), rng.integers(0, n_neg, (b, n_neg))
        diffs[start: start + b] = (
            _bootstrap(candidate[labels], candidate[~labels], pick_pos, pick_neg, target)
            - _bootstrap(baseline[labels], baseline[~labels], pick_pos, pick_neg, target))
    low, high = (float(v) for v in np.quantile(diffs, [0.025, 0.975]))
    difference = spec_c - spec_b
    passes = low >= -margin
    verdict = "non-inferior" if passes else "inferior" if high < -margin else "inconclusive"
    needed = None
    if verdict == "inconclusive" and difference > -margin:  # the interval's half-width shrinks as 1/√positives
        needed = math.ceil(n_pos * ((difference - low) / (difference + margin)) ** 2)
    because = {
        "non-inferior": f"non-inferior: the lower end {low:+.4f} ≥ −{margin}",
        "inferior": f"NOT non-inferior: the whole interval lies below −{margin} (inferior)",
        "inconclusive": (f"NOT non-inferior: the lower end {low:+.4f} < −{margin}; inconclusive, the interval also "
                         f"holds −{margin} and above: "
                         + (f"at this difference about {needed:,} positives would show it" if needed else
                            "at this point estimate no number of positives would show it")),
    }[verdict]
    return {
        "target_sensitivity": target, "margin": margin, "n": int(len(labels)), "positives": n_pos,
        "negatives": n_neg, "candidate_specificity": spec_c, "baseline_specificity": spec_b,
        "difference": difference, "interval": [low, high], "resamples": resamples, "seed": seed,
        "interval_kind": "paired stratified bootstrap, 95% percentile (its lower end a one-sided 97.5% bound)",
        "passes": passes, "verdict": verdict, "positives_needed": needed,
        "statement": (f"specificity at {target:.0%} sensitivity (matched): {spec_c:.4f} vs the baseline's {spec_b:.4f}, "
                      f"difference {difference:+.4f} (95% CI {low:+.4f} to {high:+.4f}; {n_pos} positives, {n_neg} "
                      f"negatives); {because}"),
    }


WHAT_TO_TRY = ("distil from the baseline (--distill) if it is the stronger model, train longer (--epochs), a wider "
               "net (--width); when the verdict is inconclusive, more labelled positives in the split (the interval "
               "narrows as 1/√positives); or, if the margin is a clinical choice, state a different --spec-margin")


SIDE_BY_SIDE_COLUMNS = ("model", "val AUC", "test AUC", "val spec @target (matched)", "test spec @target (matched)",
                        "threshold", "test sensitivity (95% CI)", "test specificity (95% CI)", "images/s at knee",
                        "batch-1 ms")


def side_by_side(candidate: dict, baseline: dict, target: float) -> list[dict]:
    """The shipped engine and the baseline, one row each, the same figures on the same images.

    Each argument: name, val_auc, test_auc, val_matched, test_matched, threshold, test (a 2×2 table's dict at the
    model's own threshold) and knee."""
    rows = []
    for model in (candidate, baseline):
        t = model["test"]
        rows.append({"model": model["name"], "val_auc": model["val_auc"], "test_auc": model["test_auc"],
                     "val_specificity_at_target": model["val_matched"],
                     "test_specificity_at_target": model["test_matched"], "target_sensitivity": target,
                     "threshold": model["threshold"],
                     "test_table": {k: t[k] for k in ("tp", "fn", "tn", "fp", "sensitivity", "sensitivity_ci95",
                                                      "specificity", "specificity_ci95")},
                     "images_per_s": model["knee"]["images_per_s"], "knee_batch": model["knee"]["batch"],
                     "batch1_latency_ms": model["knee"]["batch1_latency_ms"]})
    rows[0]["speedup_vs_baseline"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows


def side_by_side_cells(row: dict) -> list[str]:
    """One side-by-side row as every renderer shows it (CLI, artifact, models)."""
    t = row["test_table"]
    return [row["model"], f"{row['val_auc']:.4f}", f"{row['test_auc']:.4f}",
            f"{row['val_specificity_at_target']:.4f}", f"{row['test_specificity_at_target']:.4f}",
            f"{row['threshold']:.4f}",
            f"{t['sensitivity']:.4f} ({t['tp']}/{t['tp'] + t['fn']}; {t['sensitivity_ci95'][0]:.4f}–"
            f"{t['sensitivity_ci95'][1]:.4f})",
            f"{t['specificity']:.4f} ({t['tn']}/{t['tn'] + t['fp']}; {t['specificity_ci95'][0]:.4f}–"
            f"{t['specificity_ci95'][1]:.4f})",
            f"{row['images_per_s']:,.0f} (b={row['knee_batch']})", f"{row['batch1_latency_ms']:.2f}"]


def side_by_side_markdown(rows: list[dict]) -> str:
    """The side-by-side as a Markdown table, with the speed-up."""
    lines = ["| " + " | ".join(SIDE_BY_SIDE_COLUMNS) + " |", "|" + "---|" * len(SIDE_BY_SIDE_COLUMNS)]
    lines += ["| " + " | ".join(side_by_side_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nspeed-up: {rows[0]['speedup_vs_baseline']:,.0f}× the baseline's images/s\n"
