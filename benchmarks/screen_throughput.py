"""End-to-end screen throughput and memory: the `screen` flow on an N-image lake (Parquet in → Parquet out,
Prefect included: a client of a warm Prefect server, and on its own ephemeral server), against the raw engine loop
on the same pixels.

    python -m benchmarks.screen_throughput [--n 100000] [--shards 10] [--repeats 3] [--profile]

The model is a ScreenNet at optimize's default width, exported and quantized INT8 U8S8 per-tensor; its weights are
random, which changes no timing (`make bench` passes the graph its model ships instead). Each measurement runs in a
fresh process, so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_lake(root: Path, n: int, shards: int, graph: dict | None = None) -> Path:
    """n generated images in `shards` MedMNIST .npz shards, ingested; a shipping-like model registered: `graph`
    ({"file": ONNX path, "candidate": name, "precision": fp32|int8}, e.g. the graph a promoted model ships), else a
    random-weight ScreenNet quantized INT8 U8S8 per-tensor."""
    import numpy as np
    import torch

    from flows.ingest import ingest
    from models.engine import OpenVinoEngine, OrtEngine, find_knee
    from models.export import export_onnx
    from models.nets import build_model
    from models.quantize import quantize_int8
    from models.registry import Registry, host_fingerprint
    from tasks.lake import Lake
    from tasks.samples import generate, write_npz
    from tasks.train import TrainSettings

    per = n // shards
    base, labels = generate(per, seed=21, name="bench")
    for i in range(shards):  # shifted copies: distinct pixels (ingest refuses duplicates), a tenth of the generating
        write_npz(root / "shards" / f"s{i:03d}.npz", {"train": (np.roll(base, i, axis=2), labels)})
    lake = root / "lake"
    ingest([str(root / "shards")], lake=str(lake))
    registry = Registry(Lake(lake))
    folder = registry.folder("sn-bench")
    calib = np.random.default_rng(0).integers(0, 256, (256, 1, 64, 64), dtype=np.uint8)
    if graph:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(graph["file"], folder / "model.onnx")
        ship = {"candidate": graph["candidate"], "precision": graph["precision"],
                "engine": graph.get("engine", "onnxruntime")}
    else:
        torch.manual_seed(0)
        net = build_model("screennet", 1, **TrainSettings().shape()).eval()
        fp32 = export_onnx(net, folder / "fp32.onnx")
        quantize_int8(fp32, folder / "model.onnx", calib, "u8s8", per_channel=False)
        fp32.unlink()
        ship = {"candidate": "int8-u8s8-per-tensor", "precision": "int8", "engine": "onnxruntime"}
    kind = OpenVinoEngine if ship["engine"] == "openvino" else OrtEngine
    knee = find_knee(kind(folder / "model.onnx", ship["precision"]), calib).as_dict()
    # A stand-in for speed, not a clinical model: no gate ran, so none is recorded, and it is screened with the
    # explicit override (allow_failed_gate) rather than promoted.
    registry.register("sn-bench", {
        "shipping": {**ship, "file": "model.onnx", "threshold": 0.5},
        "knees": {host_fingerprint(ship["engine"], ship["precision"]): knee}})
    return lake


def measure_flow(lake: Path, profile: bool) -> dict:
    # Warm the ephemeral server with a cheap flow run, so its start-up (10-20 s) is not counted.
    from prefect import flow

    from flows.screen import screen

    flow(lambda: None, name="warm-up")()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    completed: list[float] = []  # when Prefect set the run's Completed state (its on_completion hooks run then)
    timed = screen.with_options(on_completion=[lambda *_: completed.append(time.perf_counter())])
    t0 = time.perf_counter()
    report = timed(lake=str(lake), version="sn-bench", allow_failed_gate=True)
    end = time.perf_counter()
    seconds = end - t0
    # What the run spent after it completed: Prefect 3.9's flow-run teardown joins its heartbeat thread, which sleeps
    # in whole seconds (0-1 s a run), then returns the result.
    result = {"images": report.scored, "seconds": seconds, "images_per_s": report.scored / seconds,
              "batch": report.batch, "peak_rss_mb": peak_rss_mb(), "shards_s": report.seconds,
              "teardown_s": end - completed[0] if completed else float("nan")}
    if profile:
        profiler.disable()
        stats = pstats.Stats(profiler).sort_stats("tottime")
        stats.print_stats(12)
    return result


def measure_engine(lake: Path) -> dict:
    """The raw loop: the same Parquet pixels, read as screening reads them, through the same engine at its knee,
    called from one thread; no Prefect, no writing."""
    from models.registry import Registry
    from tasks.lake import Lake, pixel_array, streaming_reader

    registry = Registry(Lake(lake))
    manifest = registry.manifest("sn-bench")
    batch = next(iter(manifest.knees.values()))["batch"]
    engine = registry.load_engine("sn-bench", allow_failed_gate=True, batch=batch)  # compiled for it, as screen does
    files = sorted((lake / "images").glob("*.parquet"))
    t0 = time.perf_counter()
    n, reading, inferring = 0, 0.0, 0.0
    for file in files:
        batches = streaming_reader(file).iter_batches(batch_size=batch, columns=["pixels"])
        while True:
            t = time.perf_counter()
            b = next(batches, None)
            if b is None:
                break
            x = pixel_array(b.column(0), 1)
            t1 = time.perf_counter()
            engine.infer(x)
            inferring += time.perf_counter() - t1
            reading += t1 - t
            n += b.num_rows
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "batch": batch,
            "peak_rss_mb": peak_rss_mb(), "read_s": reading, "infer_s": inferring}


def run(n: int, shards: int, profile: bool = False, log=print, graph: dict | None = None, repeats: int = 3,
        one_off: bool = True) -> dict:
    """Build an n-image lake, then measure the raw engine loop and the flow, each in a fresh process: the flow as
    deployments and `make serve` run it, a client of a Prefect server (PREFECT_API_URL's, else one started here),
    and as a one-off `screenline screen` with no server runs it, starting Prefect's ephemeral server from its own
    process (which imports the server's code there: ~70 MB more). Each is measured `repeats` times, in turns (a
    busy neighbour slows all three alike); each figure is the median of its runs, "runs" lists them. `one_off`
    False leaves the ephemeral-server run out (the smoke run's ~15 s of server start)."""
    from prefect.server.api.server import SubprocessASGIServer

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="screenline-screen-bench-") as tmp:
        t0 = time.perf_counter()
        lake = build_lake(Path(tmp), n, shards, graph)
        log(f"built a {n}-image lake in {time.perf_counter() - t0:.0f} s")
        server = None if os.environ.get("PREFECT_API_URL") else SubprocessASGIServer()
        if server:
            server.start(timeout=float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        plain = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server: an ephemeral one
        client = {**plain, "PREFECT_API_URL": server.api_url if server else os.environ["PREFECT_API_URL"]}
        measures = [("engine", plain), ("flow", client)] + ([("flow_ephemeral", plain)] if one_off else [])
        try:
            for _ in range(repeats):
                for what, env in measures:
                    shutil.rmtree(lake / "predictions", ignore_errors=True)  # every flow run scores every image
                    cmd = [sys.executable, "-m", "benchmarks.screen_throughput", "--measure", what, str(lake)]
                    profiling = profile and what == "flow" and not runs.get("flow")
                    out = subprocess.run(cmd + (["--profile"] if profiling else []), capture_output=True, text=True,
                                         check=True, env=env).stdout
                    if profiling:
                        log(out[: out.find("RESULT")])
                    result = json.loads(out[out.find("RESULT") + 7:].splitlines()[0])
                    runs.setdefault(what, []).append(result)
                    if "read_s" in result:
                        split = (f" (Parquet read + pixel view {result['read_s']:.2f} s, engine "
                                 f"{result['infer_s']:.2f} s)")
                    else:
                        split = f" (Prefect's teardown after the run completed: {result['teardown_s']:.2f} s)"
                    log(f"{what:>14}: {result['images']} images in {result['seconds']:.2f} s = "
                        f"{result['images_per_s']:,.0f} images/s at batch {result['batch']}, "
                        f"peak RSS {result['peak_rss_mb']:.0f} MB{split}")
        finally:
            if server:
                server.stop()
    results: dict = {what: {**done[0], "images_per_s": statistics.median(r["images_per_s"] for r in done),
                            "seconds": statistics.median(r["seconds"] for r in done),
                            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in done),
                            "runs": [[round(r["images_per_s"]), round(r["peak_rss_mb"])] for r in done]}
                     for what, done in runs.items()}
    for what in ("flow", "flow_ephemeral"):
        if what in results:
            results[what]["teardown_s"] = statistics.median(r["teardown_s"] for r in runs[what])
            results[what]["teardowns_s"] = [round(r["teardown_s"], 3) for r in runs[what]]
    results["candidate"] = (graph or {}).get("candidate", "int8-u8s8-per-tensor (random weights)")
    results["flow_vs_engine"] = results["flow"]["images_per_s"] / results["engine"]["images_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement, in turns (median)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the flow run")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "LAKE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        what, lake = args.measure
        result = measure_engine(Path(lake)) if what == "engine" else measure_flow(Path(lake), args.profile)
        print("RESULT " + json.dumps(result))
        return
    run(args.n, args.shards, args.profile, log=lambda line: print(line, flush=True), repeats=args.repeats)


if __name__ == "__main__":
    main()
