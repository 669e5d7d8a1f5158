"""The speed levers, measured one at a time against the engine as it ships: `make bench` runs this after the table.

    python -m benchmarks.levers [--lake lake] [--threads 2] [--quick] [--out FILE.json]

Each lever changes one thing from the shipped configuration (the lake's promoted model, else a random-weight
ScreenNet at the default width; one ONNX Runtime session with all the cores, spinning off, the memory arena on) and
reports the best throughput over a batch sweep and the batch-1 latency:

- ORT session options: intra-op spinning on; the memory arena off; the graph optimized once and saved (load time);
- one engine per core (two single-thread sessions on two Python threads) vs one engine with two threads;
- OpenVINO on the INT8 graphs, one caller on one stream vs two callers at once on two streams (the screen flow);
- INT8 formats: U8S8 vs S8S8, per-tensor vs per-channel (the promoted model's own graphs);
- the architecture (issue 18's cheaper net): the SHAPES (width × stem × depth, models/nets.py), INT8 on ONNX
  Runtime and OpenVINO, each swept by `find_knee` as optimize sweeps, then OpenVINO's S8S8 engines of every shape
  measured again in turns (`models.engine.runoff`), each as a share of the default shape's: the sweeps ran minutes
  apart, the run-off on the same footing (random weights: speed only; the quality of a shape is what
  `benchmarks/parity.py` measures, see README "Performance");
- torch eager channels-last vs contiguous (the torch path, for reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import latest_model, log

BATCHES = (8, 16, 32, 64, 128)
SHAPES = ((1.25, "patch4", 1.0), (1.5, "patch4", 0.5), (1.25, "patch4", 0.5), (1.0, "patch4", 1.0),
          (1.0, "patch4", 0.5), (0.75, "patch4", 1.0), (1.25, "conv3s2", 1.0), (1.0, "conv3s2", 1.0))
"""(width, stem, depth) of the random-weight nets whose engines are measured side by side; the first is the default
(tasks.train.TrainSettings), the others the points of the speed/quality front benchmarks/parity.py trained."""


def best_throughput(run, pixels: np.ndarray, seconds: float, batches=BATCHES) -> dict:
    """The best images/s over `batches` (each timed for `seconds` after a warm-up) and batch-1 p50 ms."""
    points = []
    for batch in batches:
        x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
        run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(x)
            n += batch
        points.append((n / (time.perf_counter() - t0), batch))
    one = pixels[:1].copy()
    run(one)
    lat = []
    for _ in range(100 if seconds >= 0.5 else 10):
        t = time.perf_counter()
        run(one)
        lat.append(time.perf_counter() - t)
    rate, batch = max(points)
    return {"images_per_s": rate, "batch": batch, "batch1_p50_ms": float(np.median(lat)) * 1000}


def parallel_throughput(runs: list, pixels: np.ndarray, seconds: float, batches=BATCHES) -> dict:
    """Aggregate images/s of len(runs) engines, each driven by its own thread on its own batches."""
    points = []
    for batch in batches:
        x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
        counts = [0] * len(runs)
        start = threading.Barrier(len(runs) + 1)
        stop = threading.Event()

        def drive(i: int, x: np.ndarray, counts: list[int], start: threading.Barrier, stop: threading.Event) -> None:
            runs[i](x)
            start.wait()
            while not stop.is_set():
                runs[i](x)
                counts[i] += len(x)

        threads = [threading.Thread(target=drive, args=(i, x, counts, start, stop)) for i in range(len(runs))]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        points.append((sum(counts) / (time.perf_counter() - t0), batch))
    rate, batch = max(points)
    return {"images_per_s": rate, "batch": batch}


def shapes(work: Path, calibration: np.ndarray, pixels: np.ndarray, threads: int, quick: bool, record,
           exported: dict[tuple[float, str, float], Path] | None = None) -> None:
    """Each SHAPES net, INT8 (U8S8 per-tensor; S8S8 per-tensor too in the full run) on ONNX Runtime and, where
    installed, OpenVINO, at its knee (`find_knee`, windows until stable), with its multiply-adds an image; then the
    OpenVINO engines of the last format, one a shape at its knee, in turns (`runoff`), each as a share of the first
    shape's. `exported`: (width, stem, depth) → a random-weight FP32 graph of that net already exported (~6 s)."""
    from models.engine import OpenVinoEngine, OrtEngine, compiled_for, find_knee, openvino_missing, runoff
    from models.export import export_onnx
    from models.nets import ScreenNet, ScreenNetConfig, macs_per_image
    from models.quantize import quantize_int8

    kinds = [OrtEngine] + ([OpenVinoEngine] if openvino_missing() is None else [])
    formats = (("u8s8", "INT8-U8S8-PER-TENSOR"),) if quick else (("u8s8", "INT8-U8S8-PER-TENSOR"),
                                                                 ("s8s8", "INT8-S8S8-PER-TENSOR"))
    sweep = {"max_batch": 8, "seconds_per_point": 0.03} if quick else {}
    contenders = {}
    for width, stem, depth in SHAPES[:2] if quick else SHAPES:
        model = ScreenNet(ScreenNetConfig(width=width, stem=stem, depth=depth)).eval()
        mmacs = macs_per_image(model) / 1e6
        name = f"width {width}, {stem} stem, depth {depth}"
        fp32 = (exported or {}).get((width, stem, depth)) or export_onnx(model, work / f"w{width}-{stem}-d{depth}.onnx")
        if (width, stem, depth) == (1.0, "conv3s2", 1.0):
            record(f"width {width} FP32 (random weights)",
                   _at_knee(find_knee(OrtEngine(fp32, threads=threads), pixels, **sweep)), mmacs=mmacs)
        for fmt, label in formats:
            int8 = quantize_int8(fp32, work / f"w{width}-{stem}-d{depth}-{fmt}.onnx", calibration, fmt, False)
            for kind in kinds:
                engine = kind(int8, "int8", threads)
                knee = find_knee(engine, pixels, **sweep)
                record(f"{name}, {kind.name} {label} (random weights)", _at_knee(knee),
                       mmacs=mmacs, width=width, stem=stem, depth=depth, engine=kind.name)
                if kind is OpenVinoEngine and fmt == formats[-1][0]:
                    contenders[name] = (compiled_for(engine, knee.batch), np.resize(pixels, (knee.batch, 1, 64, 64)),
                                        mmacs, label)
    if len(contenders) > 1:
        turns = runoff({n: c[:2] for n, c in contenders.items()}, 0.03 if quick else 0.2)
        first = next(iter(contenders))
        for n, (_, x, mmacs, label) in contenders.items():
            share = statistics.median(a / b for a, b in zip(turns[n]["windows"], turns[first]["windows"]))
            record(f"{n}, openvino {label}, in turns", {"images_per_s": turns[n]["images_per_s"], "batch": len(x)},
                   mmacs=mmacs, of_default=round(share, 3), spread=turns[n]["spread"])


def openvino_callers(graphs: dict[str, Path], pixels: np.ndarray, threads: int, seconds: float, record) -> None:
    """Each INT8 graph on OpenVINO called as a single caller calls it (one stream of `threads` threads: the bench's
    table, the raw loop) and as the screen flow's shard tasks call it (`threads` callers at once, a stream of one
    thread each; models/engine.py)."""
    from models.engine import OpenVinoEngine, openvino_missing

    if openvino_missing() is not None:
        return
    for name, path in graphs.items():
        if name == "fp32":
            continue
        record(f"OV {name.upper()}, one caller, one stream of {threads} threads",
               best_throughput(OpenVinoEngine(path, "int8", threads).infer, pixels, seconds), engine="openvino")
        shared = OpenVinoEngine(path, "int8", threads=1, callers=threads)
        record(f"OV {name.upper()}, {threads} callers at once, {threads} streams × 1 thread (as screen calls it)",
               parallel_throughput([shared.infer] * threads, pixels, seconds), engine="openvino")


def _at_knee(knee) -> dict:
    return {"images_per_s": knee.images_per_s, "batch": knee.batch, "batch1_p50_ms": knee.batch1_latency_ms}


def ort_session(path: Path, threads: int, spinning: bool = False, arena: bool = True, save_to: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if save_to:
        options.optimized_model_filepath = str(save_to)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny timings")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--fp32", help="a random-weight ScreenNet of the default width and stem, its FP32 graph as "
                                       "exported (the bench's), measured instead of exporting another")
    args = parser.parse_args(argv)
    seconds = 0.05 if args.quick else 0.5
    from models.engine import OrtEngine
    from models.export import export_onnx
    from models.nets import ScreenNet, ScreenNetConfig
    from models.quantize import quantize_int8
    from tasks.samples import generate
    from tasks.train import TrainSettings

    pixels = generate(256, 0.1, 123, "a", "levers")[0][:, None]
    calibration = generate(128, 0.1, 5, "b", "calibration")[0][:, None]
    results: list[dict] = []

    def record(lever: str, figures: dict, **extra) -> None:
        results.append({"lever": lever, **figures, **extra})
        log(f"{lever}: {figures['images_per_s']:,.0f} images/s at batch {figures['batch']}"
            + (f", batch-1 p50 {figures['batch1_p50_ms']:.3f} ms" if "batch1_p50_ms" in figures else ""))

    with tempfile.TemporaryDirectory(prefix="screenline-levers-") as tmp:
        work = Path(tmp)
        shipped = None if args.quick else latest_model(Path(args.lake))
        width = TrainSettings().width
        if shipped:
            folder, manifest = shipped["folder"], shipped["manifest"]
            # the graphs (an ov- or trt- candidate is one of them on another engine; these levers are ORT's)
            graphs = {c["name"]: folder / c["file"] for c in manifest.candidates
                      if not c["name"].startswith(("ov-", "trt-"))}
            width = manifest.architecture["width"]
            source = f"model {shipped['version']}"
        else:
            config = ScreenNetConfig(width=width, stem=TrainSettings().stem)
            fp32 = Path(args.fp32) if args.fp32 else export_onnx(ScreenNet(config).eval(), work / "fp32.onnx")
            graphs = {"fp32": fp32, "int8-u8s8-per-tensor":
                      quantize_int8(fp32, work / "u8s8.onnx", calibration, "u8s8", False)}
            source = "random-weight ScreenNet"
        log(f"levers on the {source} (width {width}), {args.threads} threads")
        fp32 = graphs["fp32"]

        record("FP32, one session, 2 threads, spinning off (as shipped)",
               best_throughput(OrtEngine(fp32, threads=args.threads).infer, pixels, seconds))
        record("FP32, spinning on", best_throughput(ort_session(fp32, args.threads, spinning=True), pixels, seconds))
        record("FP32, memory arena off", best_throughput(ort_session(fp32, args.threads, arena=False), pixels, seconds))
        t = time.perf_counter()
        ort_session(fp32, args.threads, save_to=work / "optimized.onnx")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        ort_session(work / "optimized.onnx", args.threads)
        warm = time.perf_counter() - t
        results.append({"lever": "FP32, graph optimized once and saved", "load_s": warm, "load_s_from_original": cold})
        log(f"session load: {cold * 1000:.0f} ms from the original graph, {warm * 1000:.0f} ms from the saved one")
        per_core = [OrtEngine(fp32, threads=1).infer for _ in range(args.threads)]
        record(f"FP32, {args.threads} engines × 1 thread (one per core)",
               parallel_throughput(per_core, pixels, seconds))
        for name, path in graphs.items():
            if name == "fp32":
                continue
            record(f"{name.upper()}, one session", best_throughput(OrtEngine(path, "int8", args.threads).infer,
                                                                  pixels, seconds))
            per_core = [OrtEngine(path, "int8", threads=1).infer for _ in range(args.threads)]
            record(f"{name.upper()}, {args.threads} engines × 1 thread",
                   parallel_throughput(per_core, pixels, seconds))

        openvino_callers(graphs, pixels, args.threads, seconds, record)

        import torch

        default_shape = (TrainSettings().width, TrainSettings().stem, TrainSettings().depth)
        shapes(work, calibration, pixels, args.threads, args.quick, record,
               {default_shape: Path(args.fp32)} if args.fp32 else None)

        torch.set_num_threads(args.threads)
        model = ScreenNet(ScreenNetConfig(width=width)).eval()
        for layout in ("contiguous", "channels-last"):
            if layout == "channels-last":
                model = model.to(memory_format=torch.channels_last)

            def run(x: np.ndarray, layout: str = layout, model: torch.nn.Module = model) -> np.ndarray:
                t = torch.from_numpy(x)
                if layout == "channels-last":
                    t = t.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    return model(t).numpy()
            record(f"torch eager FP32, {layout}", best_throughput(run, pixels, seconds))

    if args.out:
        Path(args.out).write_text(json.dumps({"source": source, "width": width, "threads": args.threads,
                                              "levers": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
