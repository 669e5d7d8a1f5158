"""Cost in lake size: one night's 2,000-image shard ingested and screened into lakes of 10k, 100k and 1M images.

    python -m benchmarks.lake_scale [--sizes 10000,100000,1000000] [--out FILE.json]

The lake grows every night; the thousandth night must cost what the first did. Each base lake is built from .npz
shards of 5,000 images (unique pixels, cheap to make), landed with `ingest_shard`, a random-weight ScreenNet (INT8
U8S8, the shipped kind) registered and every image screened. Then, each in a fresh process so its peak RSS (VmHWM)
is its own, a new 2,000-image PNG tar is ingested (`ingest_shard`: decode, hashes, the duplicate check against the
lake, the commit) and the lake screened (what the screen flow does per run, without Prefect: orphans swept, the
shards triaged, a current one two stats where the footer memos of tasks/footers.py hold its files, the new shard
scored); five nights, a new shard each, in turns across the sizes once every lake is built; medians quoted. The
signing keys are a temp folder's, never the user's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_SHARD = 5000
NIGHT = 2000


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(root: Path, n: int) -> tuple[Path, dict]:
    """A lake of n images in shards of PER_SHARD, a registered model, every image screened; and what its ingests
    took (each shard's time: the nights whose index merged runs stand out)."""
    import numpy as np
    import torch

    from models.engine import OrtEngine, find_knee
    from models.export import export_onnx
    from models.nets import build_model
    from models.quantize import quantize_int8
    from models.registry import Registry, host_fingerprint
    from tasks.hashes import HashIndex
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.samples import write_npz
    from tasks.shards import fingerprint
    from tasks.train import TrainSettings

    lake = Lake(root / "lake")
    lake.ensure_channels(1)
    took: list[float] = []
    for start in range(0, n, PER_SHARD):
        ids = np.arange(start, min(n, start + PER_SHARD))
        x = np.zeros((len(ids), 64, 64), np.uint8)
        for byte in range(3):  # unique pixels; "base" in the top row keeps them apart from the night's images
            x[:, 63, byte] = (ids >> (8 * byte)) & 0xFF
        x[:, 63, 3] = 255
        path = root / "shards" / f"base-{start:08d}.npz"
        write_npz(path, {"train": (x, (ids % 2).astype(np.uint8))})
        t0 = time.perf_counter()
        ingest_shard(fingerprint(path), lake, IngestOptions(channels=1))
        took.append(time.perf_counter() - t0)
        path.unlink()
    registry = Registry(lake)
    folder = registry.folder("sn-bench")
    calib = np.random.default_rng(0).integers(0, 256, (256, 1, 64, 64), dtype=np.uint8)
    torch.manual_seed(0)
    net = build_model("screennet", 1, **TrainSettings().shape()).eval()
    fp32 = export_onnx(net, folder / "fp32.onnx")
    quantize_int8(fp32, folder / "model.onnx", calib, "u8s8", per_channel=False)
    fp32.unlink()
    knee = find_knee(OrtEngine(folder / "model.onnx", "int8"), calib).as_dict()
    registry.register("sn-bench", {  # a stand-in for speed: no gate ran, so screening names the override
        "shipping": {"engine": "onnxruntime", "candidate": "int8-u8s8-per-tensor", "precision": "int8",
                     "file": "model.onnx", "threshold": 0.5},
        "knees": {host_fingerprint("onnxruntime", "int8"): knee}})
    screen_lake(lake)
    with lake.lock(), HashIndex.open(lake) as index:
        levels = index.levels()
    slowest = max(range(len(took)), key=took.__getitem__)
    return lake.root, {"lake_images": n, "shards": len(took), "ingest_median_s": statistics.median(took),
                       "ingest_max_s": took[slowest], "slowest_shard": slowest, "index_runs_by_level": levels}


def screen_lake(lake) -> dict:
    """What the screen flow does in one run, without Prefect: sweep orphans, list the shards, triage them (current
    ones cost two stats, or two footer reads where the memos do not hold them, and no task), score the rest."""
    import uuid

    from tasks.predictions import sweep_orphans
    from tasks.screen import list_shards_task, resolve_model, screen_shard, triage

    sweep_orphans(lake)
    model = resolve_model(lake, "sn-bench", workers=1, allow_failed_gate=True)
    shards = list_shards_task.fn(str(lake.root))
    pending, _ = triage(model, shards)
    run_id = str(uuid.uuid4())
    statuses = [screen_shard(shard_id, model, run_id).status for shard_id, _ in pending]
    return {"scored_shards": statuses.count("scored"), "shards": len(shards)}


def night_shard(root: Path, night: int) -> Path:
    from tasks.samples import generate, write_tar

    path = root / f"night{night}.tar"
    if not path.exists():
        write_tar(path, *generate(NIGHT, 0.1, 5 + night, "a", "night"), prefix=f"night{night}")
    return path


def measure(lake_root: Path, shard: Path, step: str) -> dict:
    """One step on the lake, in this (fresh) process: its time (imports excluded: the same at every size) and peak
    RSS."""
    import pyarrow as pa

    import tasks.screen  # noqa: F401  (Prefect's import, ~1 s)

    pa.array([0])  # pyarrow imports pandas on its first conversion (~0.3 s): an import too, not the lake's cost
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.shards import fingerprint

    lake = Lake(lake_root)
    t0 = time.perf_counter()
    if step == "ingest":
        summary = ingest_shard(fingerprint(shard), lake, IngestOptions(channels=1))
        what = {"accepted": summary.accepted, "rejected": summary.rejected}
    else:
        what = screen_lake(lake)
    return {"step": step, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), **what}


REPEATS = 5
"""Nights per lake size (a new shard each, so each ingest lands), run in turns across the sizes once every lake is
built: the table quotes their medians. Run size after size, the 2026-12-06 run on a noisy host read 1.28× for the
1M lake's ingest where a profile of one ingest into each found 11 ms between them (its commit), ~2% of the night."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--lake", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(measure(args.lake, args.shard, args.step)))
        return
    rows, builds, lakes = [], [], {}
    with tempfile.TemporaryDirectory(prefix="screenline-scale-") as tmp:
        os.environ["SCREENLINE_KEYS"] = str(Path(tmp) / "keys")
        nights = [night_shard(Path(tmp), i) for i in range(REPEATS)]
        for n in (int(s) for s in args.sizes.split(",")):
            t0 = time.perf_counter()
            lakes[n], built = build(Path(tmp) / f"lake-{n}", n)
            builds.append(built)
            print(f"lake of {n:,} images built and screened in {time.perf_counter() - t0:.0f} s; its "
                  f"{built['shards']} {PER_SHARD:,}-image ingests: median {built['ingest_median_s']:.2f} s, slowest "
                  f"{built['ingest_max_s']:.2f} s (shard {built['slowest_shard']}); index runs by level "
                  f"{built['index_runs_by_level']}", flush=True)
        os.sync()  # the builds' writes on disk before anything is timed, not in a timed fsync's way
        for night, shard in enumerate(nights):  # in turns: a night of each size, so the host's drift is shared
            for n, lake in lakes.items():
                for step in ("ingest", "screen"):
                    done = subprocess.run([sys.executable, "-m", "benchmarks.lake_scale", "--step", step, "--lake",
                                           str(lake), "--shard", str(shard)], capture_output=True, text=True,
                                          check=True)
                    row = {"lake_images": n, "night": night, **json.loads(done.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    extra = {k: v for k, v in row.items() if k not in ("step", "seconds", "peak_rss_mb",
                                                                         "lake_images", "night")}
                    print(f"  night {night}, {n:,} images: {step} {row['seconds']:.2f} s, peak RSS "
                          f"{row['peak_rss_mb']:.0f} MB {extra}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"nights": rows, "builds": builds}, indent=2))
    median = {(n, step): (statistics.median(r["seconds"] for r in rows if (r["lake_images"], r["step"]) == (n, step)),
                          statistics.median(r["peak_rss_mb"] for r in rows if (r["lake_images"], r["step"]) == (n, step)))
              for n, step in dict.fromkeys((r["lake_images"], r["step"]) for r in rows)}
    smallest = rows[0]["lake_images"]
    print(f"medians of {REPEATS} nights, each step in a fresh process:")
    for (n, step), (seconds, rss) in median.items():
        base_s, base_rss = median[(smallest, step)]
        print(f"{n:>9,} images  {step:<6}  {seconds:6.2f} s ({seconds / base_s:.2f}×)  {rss:5.0f} MB "
              f"({rss / base_rss:.2f}×)")


if __name__ == "__main__":
    main()
