"""Ingest throughput: images/s for the `ingest` flow on N generated images, Prefect included, server warm; and
peak memory on hostile shards.

    python -m benchmarks.ingest_throughput [--n 20000] [--shards 4] [--format tar|png|npz]
    python -m benchmarks.ingest_throughput --hostile [--n 1000000] [--bomb-gib 4]

The ephemeral server's start (10-20 s) is paid by a warm-up run on a tiny shard and not counted: a nightly run on a
real server does not pay it either. `--hostile` lands, each in a fresh process through the same `ingest_shard` the
flow runs, a compressed .npz of N images (a few MB declaring N × 4 KiB: 3.8 GiB at a million), a .tar.gz whose one
member is `--bomb-gib` GiB of zeros (a gzip bomb) beside 100 good images, and an .npz whose header declares 40 GB
it does not hold; and reports each one's time and peak RSS.
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
    parser.add_argument("--n", type=int, help="images (default 20,000; with --hostile 1,000,000)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--format", choices=("tar", "png", "npz"), default="tar")
    parser.add_argument("--hostile", action="store_true", help="peak RSS on hostile shards (see above)")
    parser.add_argument("--bomb-gib", type=float, default=4.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--land", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.land:
        return land_one(Path(args.land))
    if args.measure:
        return measure(Path(args.measure), args.format)
    if args.hostile:
        return hostile(args.n or 1_000_000, args.bomb_gib)
    args.n = args.n or 20000
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

def hostile(n: int, bomb_gib: float) -> None:
    """Make the hostile shards, then land each in a fresh process and report its time and peak RSS."""
    import tarfile
    import zipfile

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="screenline-hostile-") as tmp:
        root = Path(tmp)
        images = np.zeros((n, 64, 64), np.uint8)
        for byte in range(3):  # every image unique, the file tiny once compressed
            images[:, 0, byte] = (np.arange(n) >> (8 * byte)) & 0xFF
        np.savez_compressed(root / "million.npz", images=images, labels=(np.arange(n) % 2).astype(np.uint8))
        del images
        good, labels = generate(100, seed=11, name="bomb-good")
        with tarfile.open(root / "bomb.tar.gz", "w:gz", compresslevel=1) as archive:
            for i, (image, label) in enumerate(zip(good, labels)):
                _add(archive, f"ok-{i:03d}.png", _png(image))
                _add(archive, f"ok-{i:03d}.cls", str(int(label)).encode())
            info = tarfile.TarInfo("bomb-000.png")
            info.size = int(bomb_gib * (1 << 30))
            archive.addfile(info, _Zeros(info.size))
        header = repr({"descr": "|u1", "fortran_order": False, "shape": (10_000_000, 64, 64)}).encode()
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        with zipfile.ZipFile(root / "liar.npz", "w") as archive:
            archive.writestr("images.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
        for name in ("million.npz", "bomb.tar.gz", "liar.npz"):
            size = (root / name).stat().st_size
            print(f"{name}: {size / 1e6:,.1f} MB on disk", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.ingest_throughput", "--land", str(root / name)],
                           check=True)


def land_one(path: Path) -> None:
    """Land one shard in a fresh lake beside it (no Prefect: ingest_shard itself), report time and peak RSS."""
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.shards import fingerprint

    lake = Lake(path.parent / f"lake-{path.stem}")
    lake.ensure_channels(1)
    t0 = time.perf_counter()
    summary = ingest_shard(fingerprint(path), lake, IngestOptions(channels=1))
    seconds = time.perf_counter() - t0
    print(f"  {path.name}: {summary.status}, {summary.accepted:,} accepted, {summary.rejected:,} rejected "
          f"{dict(summary.reasons)}; {seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MB", flush=True)


def _png(image) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _add(archive, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


class _Zeros:
    """A file object of `size` zero bytes, made as they are read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


if __name__ == "__main__":
    main()
