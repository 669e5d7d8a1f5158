"""Clinical parity's ablation: which training recipe brings ScreenNet's specificity at 98% sensitivity (matched:
each model at its own threshold reaching 98% on the same images) to the baseline's, on two generated sets.

    python -m benchmarks.parity --data sample|harder [--device cuda] [--only NAME,...] [--out FILE.json]
    python -m benchmarks.parity --table FILE.json [FILE.json ...]     # the Markdown table of one or more runs

`sample` is the sample set's three training sites (tasks/samples.py, 8,000 images each) split by image hash as a lake
would split them, with the three hold-out shards; `harder` adds the faint site (findings at 0.3 of the contrast) to
training and hold-out, 6,000 images per site. Every variant is trained by `tasks.train.fit`, the function optimize
trains with (here on arrays, on any device); the baseline (ResNet18 at native 64×64, the architecture `--baseline
train` trains) is trained the same way and is the teacher of the distillation variants. Figures: AUC, specificity at
98% matched on val and hold-out, the paired bootstrap (tasks/parity.py) of the difference to the baseline on each, and
minutes on this device (CPU minutes for the default budget come from `--cpu-epoch-seconds`, measured on the 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tasks.baseline import BASELINE_TRAINING as BASELINE
from tasks.dataset import split_of
from tasks.metrics import auc
from tasks.parity import bootstrap_sd, matched_specificity, noninferiority, partial_specificity
from tasks.samples import generate
from tasks.train import TrainSettings, fit, logits

TARGET = 0.98
SCREENNET = TrainSettings()  # the recipe optimize used before this ablation
VARIANTS: dict[str, dict] = {
    "screennet (as before)": {},
    "kd T=4 a=0.5": {"teacher": "baseline"},
    "kd T=2 a=0.5": {"teacher": "baseline", "temperature": 2.0},
    "kd T=4 a=0.9": {"teacher": "baseline", "distill_weight": 0.9},
    "epochs 24": {"epochs": 24},
    "epochs 32": {"epochs": 32},
    "width 1.5": {"width": 1.5},
    "width 2.0": {"width": 2.0},
    "width 1.0": {"width": 1.0},
    "ema .999": {"ema": 0.999},
    "label smoothing .1": {"label_smoothing": 0.1},
    "focal": {"loss": "focal"},
    "sgd cosine lr .05": {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-5},
    "lr 2e-3": {"lr": 2e-3},
    "lr 8e-3": {"lr": 8e-3},
    "shift aug": {"augment": "flip-exposure-shift"},
    "batch 64": {"batch_size": 64},
}


def make_data(which: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/val/test by image hash (as a lake splits) and the hold-out shards; N×1×64×64 uint8."""
    sites, per_site, holdout = (("a", "b", "c"), 8000, 1000) if which == "sample" else (("a", "b", "c", "faint"),
                                                                                          6000, 1000)
    parts: dict[str, list] = {"train": [], "val": [], "test": [], "holdout": []}
    for site in sites:
        x, y = generate(per_site, 0.1, 0, site, "train")
        where = np.array([split_of(hashlib.sha256(img.tobytes()).hexdigest()) for img in x])
        for name in ("train", "val", "test"):
            parts[name].append((x[where == name], y[where == name]))
        parts["holdout"].append(generate(holdout, 0.1, 0, site, "holdout"))
    return {k: (np.concatenate([p[0] for p in v])[:, None], np.concatenate([p[1] for p in v])) for k, v in parts.items()}


def figures(scores: dict[str, np.ndarray], data: dict, reference: dict[str, np.ndarray] | None) -> dict:
    """AUC and matched specificity per evaluation split, and the difference to the reference (baseline)."""
    out = {}
    for name in ("val", "holdout", "test"):
        y = data[name][1]
        row = {"auc": auc(scores[name], y), "spec_at_98": matched_specificity(scores[name], y, TARGET),
               "partial_spec": partial_specificity(scores[name], y, TARGET)}
        if reference is not None:
            ni = noninferiority(scores[name], reference[name], y, TARGET, margin=0.03, seed=0)
            row.update(difference=ni["difference"], lower=ni["interval"][0], upper=ni["interval"][1],
                       sd_matched=bootstrap_sd(scores[name], reference[name], y, TARGET, False),
                       sd_partial=bootstrap_sd(scores[name], reference[name], y, TARGET, True),
                       partial_difference=row["partial_spec"] - partial_specificity(reference[name], y, TARGET))
        out[name] = row
    return out


def train_and_score(settings: TrainSettings, data: dict, device: str, teacher: np.ndarray | None,
                    save: str | None = None) -> tuple:
    t0 = time.perf_counter()
    state, fitted = fit(*data["train"], *data["val"], settings, 1, teacher, device=device, log=lambda _: None)
    minutes = (time.perf_counter() - t0) / 60
    from tasks.train import build_model

    model = build_model(settings.arch, 1, settings.width)
    model.load_state_dict(state)
    if save:
        import torch

        torch.save(state, save)
    model = model.to(device)
    raw = {name: logits(model, data[name][0], device=device) for name in ("train", "val", "holdout", "test")}
    scores = {k: 1 / (1 + np.exp(-v.astype(np.float64))) for k, v in raw.items()}
    return scores, raw["train"], minutes, fitted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("sample", "harder"), default="sample")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-cache", help="a .npz to keep the baseline's scores and logits in (shared by runs)")
    parser.add_argument("--save-baseline", help="write the baseline's state_dict here (a checkpoint for --baseline)")
    parser.add_argument("--out", help="write the results as JSON (after every variant)")
    parser.add_argument("--table", nargs="*", help="print the Markdown table of these result files and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table([row for f in args.table for row in json.loads(Path(f).read_text())["rows"]]))
        return
    data = make_data(args.data)
    cache = Path(args.baseline_cache) if args.baseline_cache else None
    rows = []
    if cache is not None and cache.exists():
        saved = np.load(cache)
        base_scores = {k: saved[k] for k in ("val", "holdout", "test")}
        teacher = saved["teacher"]
    else:
        base_scores, teacher, minutes, fitted = train_and_score(replace(BASELINE, seed=args.seed), data, args.device,
                                                                 None, args.save_baseline)
        rows.append({"variant": "baseline resnet18-native", "data": args.data, "minutes": minutes,
                     "epochs": BASELINE.epochs, **figures(base_scores, data, None)})
        print(json.dumps(rows[-1]), flush=True)
        if cache is not None:
            np.savez(cache, teacher=teacher, **{k: base_scores[k] for k in ("val", "holdout", "test")})
    names = [n for n in args.only.split(",") if n != "none"] if args.only else list(VARIANTS)
    for name in names:
        overrides = dict(VARIANTS[name])
        use_teacher = overrides.pop("teacher", None) == "baseline"
        settings = replace(SCREENNET, seed=args.seed, **overrides)
        scores, _, minutes, fitted = train_and_score(settings, data, args.device, teacher if use_teacher else None)
        rows.append({"variant": name, "data": args.data, "minutes": minutes, "epochs": settings.epochs,
                     "width": settings.width, **figures(scores, data, base_scores)})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))


def table(rows: list[dict]) -> str:
    head = ("| data | variant | val AUC | val spec@98 | Δ val (95% CI) | hold-out AUC | hold-out spec@98 | "
            "Δ hold-out (95% CI) | test spec@98 | minutes (device) |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def delta(r: dict) -> str:
        return f"{r['difference']:+.3f} ({r['lower']:+.3f}, {r['upper']:+.3f})" if "difference" in r else "—"

    return head + "".join(
        f"| {r['data']} | {r['variant']} | {r['val']['auc']:.4f} | {r['val']['spec_at_98']:.3f} | {delta(r['val'])} | "
        f"{r['holdout']['auc']:.4f} | {r['holdout']['spec_at_98']:.3f} | {delta(r['holdout'])} | "
        f"{r['test']['spec_at_98']:.3f} | {r['minutes']:.1f} |\n" for r in rows)


if __name__ == "__main__":
    main()
