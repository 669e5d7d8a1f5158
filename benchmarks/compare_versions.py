"""Two registered versions side by side on the same held-out images: every graph each ships, on every CPU engine,
specificity at the target sensitivity (matched: each at its own threshold reaching it on these images), and the
paired difference A − B with its bootstrap interval (the non-inferiority gate's figure, tasks/parity.py).

    python -m benchmarks.compare_versions --lake lake --subset evaluation VERSION_A VERSION_B [--out FILE.json]

The images are the lake's held-out test split plus the labelled images of `--subset` (as `optimize --test-subset`
holds them out): the split is made by hash, so both versions' test images are the same when they were trained on
the same lake. Graph files are checked against their manifest's sha256 before loading. This is how the depth
ablation's candidate was confirmed on the sample lake (README "Depth against width"): a benchmark's reference set
and a lake's own held-out images can disagree, and the second is what a site sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TARGET = 0.98


def paired_rows(a: dict[tuple[str, str], np.ndarray], b: dict[tuple[str, str], np.ndarray], labels: np.ndarray,
                target: float = TARGET) -> list[dict]:
    """For each (engine, graph) both score: each one's matched specificity, A − B and its paired 95% interval."""
    from tasks.parity import noninferiority

    rows = []
    for key in [k for k in a if k in b]:
        ni = noninferiority(a[key], b[key], labels, target)
        rows.append({"engine": key[0], "graph": key[1], "a": round(ni["candidate_specificity"], 4),
                     "b": round(ni["baseline_specificity"], 4), "difference": round(ni["difference"], 4),
                     "interval95": [round(v, 4) for v in ni["interval"]], "positives": ni["positives"],
                     "negatives": ni["negatives"]})
    return rows


def scores_of(lake: Path, version: str, pixels: np.ndarray, threads: int = 2) -> dict[tuple[str, str], np.ndarray]:
    """Every graph of a version (its manifest's candidates, verified), on ONNX Runtime and, where installed,
    OpenVINO: {(engine, graph): scores}."""
    from models.engine import OpenVinoEngine, OrtEngine, openvino_missing, scores
    from models.registry import Registry
    from tasks.lake import Lake

    registry = Registry(Lake(lake))
    manifest = registry.manifest(version)
    kinds = [OrtEngine] + ([OpenVinoEngine] if openvino_missing() is None else [])
    out = {}
    for candidate in manifest.candidates:
        name = candidate["name"]
        if name.startswith(("ov-", "trt-")):  # the same graphs on another engine: measured on each engine below
            continue
        path = registry.verified_file(version, candidate["file"])
        for kind in kinds:
            out[(kind.name, name)] = scores(kind(path, candidate["precision"], threads), pixels, batch=512)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--subset", action="append", default=[], help="a labelled subset held out with the test split")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from tasks.dataset import load_split, make_split
    from tasks.lake import Lake

    x, y = load_split(make_split(Lake(Path(args.lake)), args.subset), "test")
    print(f"held-out: {len(y):,} images, {int(y.sum()):,} positive", flush=True)
    rows = paired_rows(scores_of(Path(args.lake), args.a, x), scores_of(Path(args.lake), args.b, x), y)
    for r in rows:
        print(f"{r['engine']:12s} {r['graph']:24s} {args.a} {r['a']:.4f}  {args.b} {r['b']:.4f}  "
              f"A − B {r['difference']:+.4f} ({r['interval95'][0]:+.4f}, {r['interval95'][1]:+.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "subsets": args.subset, "target": TARGET,
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
