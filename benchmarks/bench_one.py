"""One benchmark configuration, measured alone in this process (so its memory is its own): run by benchmarks.bench.

    python -m benchmarks.bench_one CONFIG.json

CONFIG.json names the runtime (torch, onnxruntime, openvino, tensorrt), the model (a torch checkpoint or an ONNX file), the
pixels to time on (a .npy of uint8 N×C×64×64), optional val/test pixels to score for quality, the thread count and
the time to spend per point. It writes the result JSON beside it: batch-1 latency percentiles, the throughput sweep
and its knee, RSS before and after creating the engine and after running at the knee, peak RSS, and the scores.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from models.engine import Engine, compiled_for, find_knee


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_engine(config: dict, batch: int | None = None) -> Engine:
    """uint8 N×C×64×64 → float32 scores (`infer`), for the configured runtime and model; `batch` the images a call
    an engine that compiles for one (OpenVINO) is compiled for."""
    runtime, threads = config["runtime"], int(config["threads"])
    if runtime == "torch":
        import torch

        from models.nets import build_model
        from tasks.train import load_checkpoint

        torch.set_num_threads(threads)
        if config.get("checkpoint"):
            model = load_checkpoint(Path(config["checkpoint"]))
        else:
            torch.manual_seed(0)
            model = build_model(config["arch"], 1, config.get("width", 1.0), config.get("pool", "avg"),
                                config.get("stem", "conv3s2"), config.get("depth", 1.0)).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.sigmoid(model(torch.from_numpy(x))).reshape(-1).numpy()
        return SimpleNamespace(infer=run)
    if runtime == "onnxruntime":
        from models.engine import OrtEngine

        return OrtEngine(Path(config["onnx"]), config.get("precision", "fp32"), threads)
    if runtime == "openvino":
        from models.engine import OpenVinoEngine

        return OpenVinoEngine(Path(config["onnx"]), config.get("precision", "fp32"), threads, batch=batch)
    if runtime == "tensorrt":
        from models import tensorrt

        top, onnx = int(config["max_batch"]), Path(config["onnx"])
        return tensorrt.engine_from_onnx(onnx, config.get("precision", "fp32"), 1, tensorrt.Profile(1, top, top),
                                         onnx.parent)
    raise ValueError(f"unknown runtime {runtime!r}")


def timed(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float, min_runs: int = 3) -> list[float]:
    """Durations (s) of repeated calls on x, for at least `seconds` and `min_runs` calls, after one warm-up."""
    run(x)
    times, t0 = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return times


def measure_memory(config: dict) -> dict:
    """Engine memory alone: RSS growth from creating the engine and running at the knee batch, in a fresh process
    (the sweep's big batches and quality scoring would otherwise grow the allocator's arena and count here)."""
    pixels = np.load(config["pixels"])
    batch = int(config["memory_at_batch"])
    x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
    rss_before = rss_mb()
    engine = make_engine(config, batch)
    rss_created = rss_mb()
    for _ in range(10):
        engine.infer(x)
    rss_knee = rss_mb()
    return {"before_engine": rss_before, "after_create": rss_created, "after_knee": rss_knee,
            "engine_growth": rss_knee - rss_before, "peak": rss_mb("VmHWM"), "batch": batch}


LATENCY_RUNTIMES = ("torch", "onnxruntime", "openvino")
"""The runtimes whose batch-1 latency is measured on one thread as well as on the configured threads."""


def batch1_latency(config: dict, engine: Engine, one: np.ndarray) -> dict:
    """Batch-1 latency percentiles (ms) at the thread count fastest for one image, with each count's p50: the
    configured threads (`engine`, compiled for one image) and one thread (an engine made for it). One image of a
    small net is too little work to share: a call's threads meet at every layer, and a host serving single images
    runs one thread a call."""
    threads = int(config["threads"])
    counts = [threads] + ([1] if threads > 1 and config["runtime"] in LATENCY_RUNTIMES else [])
    runs = {}
    for count in counts:
        single = compiled_for(engine, 1) if count == threads else make_engine({**config, "threads": count}, 1)
        runs[count] = np.array(timed(single.infer, one, config["latency_seconds"], config["latency_min_runs"])) * 1000
    if config["runtime"] == "torch":  # make_engine set the process's threads: the sweep runs on the configured ones
        import torch

        torch.set_num_threads(threads)
    p50 = {count: float(np.percentile(ms, 50)) for count, ms in runs.items()}
    best = min(p50, key=p50.get)
    ms = runs[best]
    return {"p50": p50[best], "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)),
            "runs": len(ms), "threads": best, "p50_by_threads": {str(count): p for count, p in p50.items()}}


def measure(config: dict) -> dict:
    if config.get("memory_at_batch"):
        return measure_memory(config)
    pixels = np.load(config["pixels"])
    rss_before = rss_mb()
    t = time.perf_counter()
    engine = make_engine(config)
    create_s = time.perf_counter() - t
    rss_created = rss_mb()

    latency = batch1_latency(config, engine, pixels[:1].copy())
    # the sweep optimize and screen measure knees with (models/engine.find_knee: windows until stable), not a copy
    found = find_knee(engine, pixels, max_batch=config["max_batch"], limit=config["max_batch"],
                      seconds_per_point=config["seconds_per_point"])
    sweep = [{"batch": p.batch, "images_per_s": p.images_per_s, "ms_per_batch": p.ms_per_batch, "spread": p.spread,
              "windows": p.windows} for p in found.sweep]
    peak = max(p["images_per_s"] for p in sweep)
    knee = next(p for p in sweep if p["batch"] == found.batch)
    x = np.ascontiguousarray(np.resize(pixels, (knee["batch"], *pixels.shape[1:])))
    run = compiled_for(engine, knee["batch"]).infer
    for _ in range(20):
        run(x)
    rss_knee = rss_mb()

    result = {
        "name": config["name"], "create_s": create_s,
        "latency_ms": latency,
        "sweep": sweep, "knee": knee, "peak_images_per_s": peak,
        "rss_mb": {"before_engine": rss_before, "after_create": rss_created, "after_knee": rss_knee,
                   "engine_growth": rss_knee - rss_before, "peak": rss_mb("VmHWM")},
    }
    for split in ("val", "test"):
        if config.get(split):
            data = np.load(config[split])
            out = [engine.infer(np.ascontiguousarray(data[i: i + 256])) for i in range(0, len(data), 256)]
            np.save(Path(config["out"]).with_name(f"{config['name']}-{split}-scores.npy"), np.concatenate(out))
    return result


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    result = measure(config)
    Path(config["out"]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
