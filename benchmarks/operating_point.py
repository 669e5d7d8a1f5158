"""The operating point, measured: how the threshold rules keep sensitivity and what specificity they leave.

    python -m benchmarks.operating_point [--lake lake] [--version V] [--splits 200] [--target 0.98] [--delta 0.05]
                                         [--crossfit K] [--out benchmarks/results]

Works on scores the lake already holds: the version's current predictions (the engine that ships, as `screen`
recorded them) of the labelled images no model of the version learned from — its validation and test splits and
every labelled audit subset. Two measurements:

1. Repeated random calibration/test splits of that pool (`--splits`, default 200, each a fresh seed): a threshold is
   chosen on the calibration part by each rule and judged on the rest. For each rule and calibration size: the share
   of splits whose test sensitivity reaches the target; the share of draws whose sensitivity on the whole pool
   reaches it when the calibration positives are drawn from the pool with replacement (what the PAC rule promises
   to be ≥ 1 − δ: the test part's own sampling noise makes the first share lower when it holds few positives); the
   median test sensitivity and specificity; and the median gap to the best specificity any threshold reaching the
   target on those test images had (what an oracle would keep). The old rule is `quantile` (sensitivity target + 0.01 on the calibration
   images, what screenline shipped before); the new one is `pac`; the calibration sizes show what more positives buy.
2. The version's own split as optimize used it: the shipped threshold on each labelled audit subset (the figure
   `make demo`'s audit quotes), beside the best specificity reachable there.

`--crossfit K` adds what cross-fitting buys: K models trained the version's way on K folds of train+val, each
scoring the fold it did not see; the PAC rule on those out-of-fold scores (K times the positives of one validation
split) gives a threshold that is then applied to the shipped engine's scores of the test split and the audit
subsets, none of which any fold model saw. It costs K trainings (their epoch minutes are in the table); the fold models live
where `optimize --calibrate-on crossfit` keeps its own (lake/models/work/), so each reuses the other's. The guarantee is approximate here: the fold models are not the shipped model,
only trained the same way on as much data, so the test-split gate is what checks it.

Writes <out>/<date>-operating-point.md and .json. A measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from benchmarks.bench import log
from tasks.thresholds import ThresholdRule, calibrate, point, threshold_for_sensitivity

REPO = Path(__file__).resolve().parent.parent


def pool_of(lake_root: Path, version: str | None) -> dict:
    """The version's current scores of every labelled image it did not learn from, with where each image sits."""
    from models.registry import Registry
    from tasks.lake import Lake
    from tasks.predictions import current_files, read_current

    lake = Lake.at(lake_root)
    registry = Registry(lake)
    pick = registry.pick(version, "auto")
    manifest = registry.manifest(pick.version)
    files, stale = current_files(lake, pick.version, manifest)
    if stale:
        log(f"{len(stale)} predictions file(s) are not current and are left out: run `screenline screen` first")
    scored = read_current(files, files, ["image_id", "score", "engine"])
    images = ds.dataset([str(p) for p in lake.shard_files()], format="parquet").to_table(
        columns=["image_id", "label", "subset"], filter=pc.field("label").is_valid())
    split = pq.read_table(lake.models / "splits" / manifest.data["split_file"], columns=["image_id", "split"])
    table = images.join(split, "image_id", join_type="left outer").join(scored, "image_id", join_type="inner")
    where = [s if s is not None else sp for s, sp in zip(table.column("subset").to_pylist(),
                                                         table.column("split").to_pylist())]
    keep = np.array([w is not None and w != "train" for w in where], dtype=bool)
    if not keep.any():
        raise SystemExit(f"{pick.version} has no current predictions of labelled images outside its training split "
                         f"in {lake.root}: run `screenline screen` (or `make demo`) first")
    return {"version": pick.version, "engine": pick.shipped.engine, "shipped": float(pick.shipped.threshold),
            "manifest": manifest, "lake": lake,
            "ids": np.array(table.column("image_id").to_pylist())[keep],
            "scores": table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)[keep],
            "labels": table.column("label").to_numpy(zero_copy_only=False).astype(np.int8)[keep],
            "where": np.array(where, dtype=object)[keep]}


def judge(scores: np.ndarray, labels: np.ndarray, threshold: float, target: float) -> dict:
    """Sensitivity and specificity at `threshold`, and the best specificity any threshold reaching `target` has on
    the same images (the oracle)."""
    at = point(scores, labels, threshold)
    best = point(scores, labels, threshold_for_sensitivity(scores, labels, target))
    return {"sensitivity": at["sensitivity"], "specificity": at["specificity"],
            "best_specificity": best["specificity"], "gap": best["specificity"] - at["specificity"],
            "normals_flagged_per_1000": at["normals_flagged_per_1000"]}


def repeated_splits(pool: dict, rules: list[tuple[str, ThresholdRule, int]], splits: int) -> list[dict]:
    """Each rule × calibration size over `splits` random stratified calibration/test splits of the pool."""
    scores, labels = pool["scores"], pool["labels"]
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rows = []
    for label, rule, n_cal in rules:
        if n_cal >= len(positives) - 50:
            log(f"skipping {label}: {n_cal} calibration positives leave too few of the pool's {len(positives)}")
            continue
        draws = []
        for seed in range(splits):
            rng = np.random.default_rng(seed)
            cal = np.concatenate([rng.choice(positives, n_cal, replace=False),
                                  rng.choice(negatives, round(n_cal * len(negatives) / len(positives)),
                                             replace=False)])
            test = np.setdiff1d(np.arange(len(labels)), cal)
            chosen = calibrate(scores[cal], labels[cal], rule)
            draws.append({"threshold": chosen.threshold, **judge(scores[test], labels[test], chosen.threshold,
                                                                 rule.target)})
        sens = np.array([d["sensitivity"] for d in draws])
        # The guarantee is about the sensitivity on the distribution, not on a finite test part (whose own sampling
        # noise reads a true 98.5% below 98% often when it holds a few hundred positives): draw the calibration
        # positives with replacement from the pool, so the pool is exactly the distribution they come from, and
        # read the threshold's sensitivity on all of the pool's positives.
        population = []
        for seed in range(splits):
            rng = np.random.default_rng(10_000 + seed)
            cal = rng.choice(positives, n_cal, replace=True)
            chosen = calibrate(scores[cal], labels[cal], rule)
            population.append(float((scores[positives] >= chosen.threshold).mean()))
        rows.append({"rule": label, "name": rule.name, "delta": rule.delta if rule.name == "pac" else None,
                     "calibration_positives": n_cal, "test_positives": int(len(positives) - n_cal),
                     "splits": splits, "share_meeting_target": float((sens >= rule.target).mean()),
                     "share_meeting_target_on_pool": float((np.array(population) >= rule.target).mean()),
                     **{f"median_{k}": float(np.median([d[k] for d in draws]))
                        for k in ("threshold", "sensitivity", "specificity", "best_specificity", "gap",
                                  "normals_flagged_per_1000")},
                     "min_sensitivity": float(sens.min())})
    return rows


def fixed_split(pool: dict, thresholds: dict[str, float], target: float) -> list[dict]:
    """Each named threshold on the test split and on each audit subset (exact two-sided 95% intervals)."""
    from tasks.metrics import figures

    rows = []
    for where in sorted(set(pool["where"]) - {"val"}):
        mask = pool["where"] == where
        for name, threshold in thresholds.items():
            f = figures(pool["scores"][mask], pool["labels"][mask], threshold)
            best = judge(pool["scores"][mask], pool["labels"][mask], threshold, target)
            rows.append({"images": where, "threshold_from": name, "threshold": threshold, "n": f.n,
                         "positives": f.positives, "sensitivity": f.sensitivity,
                         "sensitivity_ci": [f.sensitivity_cp_low, f.sensitivity_cp_high],
                         "specificity": f.specificity, "specificity_ci": [f.specificity_cp_low, f.specificity_cp_high],
                         "best_specificity": best["best_specificity"],
                         "normals_flagged_per_1000": best["normals_flagged_per_1000"]})
    return rows


def crossfit_scores(pool: dict, folds: int) -> dict:
    """Out-of-fold scores of train+val from `folds` models trained the version's way: the same fold splits and
    training as `optimize --calibrate-on crossfit`, in the same work folders, so either reuses the other's models."""
    from tasks.dataset import fold_split, load_split, split_of_version
    from tasks.optimize import train_output
    from tasks.train import TrainSettings, load_checkpoint, predict, train_model

    manifest, lake = pool["manifest"], pool["lake"]
    settings = TrainSettings(**manifest.training["settings"])
    base = split_of_version(lake, manifest.data)
    scores, labels, minutes = [], [], []
    for k, fold in enumerate(fold_split(base, k, folds) for k in range(folds)):
        checkpoint = train_output({"split": fold, "settings": settings})
        started = time.perf_counter()
        if not checkpoint.exists():
            log(f"cross-fit fold {k + 1}/{folds}: training on {fold.counts['train']['images']} images")
            train_model(fold, settings, checkpoint.parent, log=lambda message: None)
        timing = json.loads((checkpoint.parent / "model.json").read_text()).get("history", [])
        minutes.append(sum(e.get("seconds", 0.0) for e in timing) / 60 or (time.perf_counter() - started) / 60)
        x, y = load_split(fold, "val")
        scores.append(predict(load_checkpoint(checkpoint), x))
        labels.append(y.astype(np.int8))
    return {"scores": np.concatenate(scores).astype(np.float64), "labels": np.concatenate(labels),
            "minutes": minutes}


def markdown(result: dict) -> str:
    pool, target = result["pool"], result["target"]
    lines = [f"# Operating point: {result['version']} ({result['engine']}), {result['measured_at']}", "",
             f"Pool: {pool['images']} labelled images no model of the version learned from ({pool['positives']} "
             f"positive: {', '.join(f'{k} {v}' for k, v in pool['by_place'].items())}). Target sensitivity "
             f"{target:.0%}. Command: `{result['command']}`.", "",
             f"## {result['splits']} random calibration/test splits of the pool", "",
             "Test sensitivity is read on the test part of each split (a few hundred positives, so it has sampling "
             "noise of its own); pool sensitivity draws the calibration positives with replacement from the pool "
             "and reads the threshold on all of the pool's positives: the statement the PAC rule makes "
             "(sensitivity on the distribution ≥ target with probability ≥ 1 − δ).", "",
             "| rule | calibration positives | share of splits: test sensitivity ≥ target | share of draws: pool "
             "sensitivity ≥ target | median test sensitivity (min) | median test specificity | median best "
             "specificity at target | median gap |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["repeated"]:
        lines.append(f"| {r['rule']} | {r['calibration_positives']} | {r['share_meeting_target']:.2f} | "
                     f"{r['share_meeting_target_on_pool']:.2f} | "
                     f"{r['median_sensitivity']:.4f} ({r['min_sensitivity']:.4f}) | {r['median_specificity']:.4f} | "
                     f"{r['median_best_specificity']:.4f} | {r['median_gap']:.4f} |")
    lines += ["", "## The version's own split", "",
              "| images | threshold from | threshold | n (positives) | sensitivity [exact two-sided 95%] | "
              "specificity [exact two-sided 95%] | best specificity at target |", "|---|---|---|---|---|---|---|"]
    for r in result["fixed"]:
        lines.append(f"| {r['images']} | {r['threshold_from']} | {r['threshold']:.4f} | {r['n']} ({r['positives']}) | "
                     f"{r['sensitivity']:.4f} [{r['sensitivity_ci'][0]:.4f}, {r['sensitivity_ci'][1]:.4f}] | "
                     f"{r['specificity']:.4f} [{r['specificity_ci'][0]:.4f}, {r['specificity_ci'][1]:.4f}] | "
                     f"{r['best_specificity']:.4f} |")
    if result.get("crossfit"):
        c = result["crossfit"]
        lines += ["", f"Cross-fit: {c['folds']} folds of train+val, {c['positives']} out-of-fold positives, "
                      f"{c['calibration']['statement']}; threshold {c['calibration']['threshold']:.4f}. Training "
                      f"minutes per fold: {', '.join(f'{m:.1f}' for m in c['minutes'])} (total "
                      f"{sum(c['minutes']):.0f}, on top of optimize's own training)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--version", default=None, help="default: the promoted one")
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--target", type=float, default=None, help="default: the version's gate")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--crossfit", type=int, default=0, metavar="K", help="also measure K-fold cross-fitting")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    pool = pool_of(Path(args.lake), args.version)
    target = args.target or pool["manifest"].target_sensitivity
    val = pool["where"] == "val"
    n_val = int(pool["labels"][val].sum())
    log(f"{pool['version']}: {len(pool['labels'])} images in the pool, {int(pool['labels'].sum())} positive; "
        f"validation split {n_val} positive")
    rules = [(f"quantile (old: target + 0.01) on {n}", ThresholdRule("quantile", target), n) for n in (n_val,)]
    rules += [(f"pac δ={args.delta} on {n}", ThresholdRule("pac", target, args.delta), n)
              for n in (149, n_val, 2 * n_val)]
    rules += [(f"pac δ={d} on {n_val}", ThresholdRule("pac", target, d), n_val) for d in (0.1, 0.2)]
    repeated = repeated_splits(pool, rules, args.splits)

    thresholds = {"shipped": pool["shipped"],
                  "old rule on val": calibrate(pool["scores"][val], pool["labels"][val],
                                               ThresholdRule("quantile", target)).threshold,
                  f"pac δ={args.delta} on val": calibrate(pool["scores"][val], pool["labels"][val],
                                                          ThresholdRule("pac", target, args.delta)).threshold}
    crossfit = None
    if args.crossfit:
        oof = crossfit_scores(pool, args.crossfit)
        chosen = calibrate(oof["scores"], oof["labels"], ThresholdRule("pac", target, args.delta))
        thresholds[f"pac δ={args.delta} cross-fit"] = chosen.threshold
        crossfit = {"folds": args.crossfit, "positives": int(oof["labels"].sum()), "calibration": chosen.as_dict(),
                    "minutes": oof["minutes"]}
    fixed = fixed_split(pool, thresholds, target)

    places = {str(w): int(pool["labels"][pool["where"] == w].sum()) for w in sorted(set(pool["where"]))}
    result = {"version": pool["version"], "engine": pool["engine"], "target": target, "splits": args.splits,
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.operating_point " + " ".join(argv or []),
              "pool": {"images": int(len(pool["labels"])), "positives": int(pool["labels"].sum()),
                       "by_place": places},
              "repeated": repeated, "fixed": fixed, "crossfit": crossfit}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.now():%Y-%m-%d}-operating-point"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
