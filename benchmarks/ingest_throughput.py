"""Ingest throughput: images/s for the `ingest` flow on N generated images, Prefect included, server warm.

    python -m benchmarks.ingest_throughput [--n 20000] [--shards 4] [--format tar|png|npz]

The ephemeral server's start (10-20 s) is paid by a warm-up run on a tiny shard and not counted: a nightly run on a
real server does not pay it either.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.ingest import ingest  # noqa: E402
from tasks.samples import generate, write_npz, write_png_folder, write_tar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--format", choices=("tar", "png", "npz"), default="tar")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(Path(args.measure), args.format)
    with tempfile.TemporaryDirectory(prefix="screenline-bench-") as tmp:
        root = Path(tmp)
        per = args.n // args.shards
        for i in range(args.shards):
            imgs, labels = generate(per, seed=11, site="abc"[i % 3], name=f"bench-{i}")
            if args.format == "tar":
                write_tar(root / "shards" / f"s{i}.tar", imgs, labels, prefix=f"s{i}")
            elif args.format == "png":
                write_png_folder(root / "shards" / f"s{i}", imgs, labels, prefix=f"s{i}")
            else:
                write_npz(root / "shards" / f"s{i}.npz", {"train": (imgs, labels)})
        # Measured in a fresh process, so its peak RSS is ingest's and not the generator's.
        subprocess.run([sys.executable, "-m", "benchmarks.ingest_throughput", "--measure", str(root),
                        "--format", args.format], check=True)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(root: Path, fmt: str) -> None:
    """Warm the server on a tiny shard, then time the flow on every shard under root/shards."""
    warm_imgs, warm_labels = generate(8, seed=11, name="warm")
    write_tar(root / "warm.tar", warm_imgs, warm_labels)
    ingest([str(root / "warm.tar")], lake=str(root / "warm-lake"))
    t0 = time.perf_counter()
    report = ingest([str(root / "shards")], lake=str(root / "lake"))
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    print(f"ingest {fmt}: {report.landed} images in {len(report.shards)} shards, {seconds:.2f} s, "
          f"{report.landed / seconds:,.0f} images/s, peak RSS {peak_mb:.0f} MB (cpus: {os.cpu_count()})")

if __name__ == "__main__":
    main()
