"""`make bench`: the seed's baseline and every engine side by side, on the same pixels and threads, in one run.

    python -m benchmarks.bench [--lake lake] [--quick] [--threads 2] [--screen-n 100000] [--out benchmarks/results]

Each configuration runs in its own process (benchmarks.bench_one), so its memory is its own: batch-1 latency
p50/p95/p99 (on one thread or the configured ones, whichever is faster for one image), a throughput sweep over batch
sizes and its knee, engine memory (RSS growth from creating the engine and running at the knee) and peak RSS, MFLOPs
an image and the GFLOP/s it achieves against this machine's measured FP32 GEMM peak. The optimized engines are the
lake's promoted model (as optimize built it; `make demo` makes one; without one, a smaller model is built the same
way in build/bench-lake, minutes, and reused by later runs), scored on its held-out test split at a threshold each
engine calibrates on validation, so no speed is quoted without the sensitivity it keeps. Ratios are against the seed
baseline (ResNet18, 64→224, torch eager FP32) measured in the same run: absolute times drift on a shared machine,
ratios much less.

Then the end-to-end `screen` flow on an N-image lake (Parquet → Parquet, Prefect included, the graph the model
ships) against the raw engine loop on the same pixels, and each speed lever one at a time (benchmarks.levers). Writes <out>/<date>-<host>.json, .md and -sweep.png. `--quick` is a smoke run (seconds,
tiny sweeps, random weights, no quality) that `make test` runs so the harness never rots; it asserts nothing about
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_features() -> list[str]:
    """The vector ISA extensions that decide FP32 vs INT8 speed (VNNI makes INT8 convolutions pay)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))
    return []


PACKAGES = ("numpy", "pyarrow", "prefect", "onnxruntime", "openvino", "torch")
"""The packages whose versions a report records: a figure moves with them (screen's and ingest's memory rose
~35 MB between two machines with the same code, on other versions of these)."""


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


# --- what is measured ----------------------------------------------------------------------------------------------


def shipped_model(lake: Path) -> dict | None:
    """The lake's promoted model: its folder, manifest, and split (None when the lake has none)."""
    from models.registry import ModelNotFound, Registry
    from tasks.lake import Lake

    registry = Registry(Lake(lake))
    try:
        version = registry.promoted()
    except ModelNotFound:
        return None
    return {"version": version, "folder": registry.folder(version), "manifest": _verified(registry, version)}


FALLBACK_LAKE = REPO / "build" / "bench-lake"
FALLBACK_IMAGES, FALLBACK_EPOCHS = 9000, 8


def fallback_lake(lake: Path = FALLBACK_LAKE, images: int = FALLBACK_IMAGES, epochs: int = FALLBACK_EPOCHS,
                  max_batch: int = 128, knee_seconds: float = 0.3) -> Path:
    """A lake with a model built the way `make demo` builds one, smaller (`images` sample images, `epochs` epochs;
    minutes): for a clean clone, where ./lake has none. Kept in build/ so the next `make bench` reuses it. The knee
    sweep's top and time a point are optimize's (the bench sweeps again itself)."""
    from flows.ingest import ingest
    from flows.optimize import NotPromoted, optimize
    from tasks.samples import make_samples

    if latest_model(lake):
        return lake
    samples = lake.parent / "bench-samples"
    log(f"building {lake}: {images:,} sample images, optimize {epochs} epochs")
    if not (samples / "train").exists():
        make_samples(samples, n=images, defects=False)
    ingest(shards=[str(samples / "train")], lake=str(lake))
    try:
        result = optimize(lake=str(lake), epochs=epochs, max_batch=max_batch, knee_seconds=knee_seconds,
                          calibrate_on="val")  # speed, not threshold
        log(f"promoted {result['version']}")
    except NotPromoted as exc:  # still registered: measured, and the table says it was not promoted
        log(f"not promoted: {exc}")
    return lake


def latest_model(lake: Path) -> dict | None:
    """The lake's promoted model, else its newest registered one; None when it has none."""
    from models.registry import Registry
    from tasks.lake import Lake

    if not (lake / "models").exists():
        return None
    registry = Registry(Lake(lake))
    if (shipped := shipped_model(lake)) or not registry.versions():
        return shipped
    version = max(registry.versions(), key=lambda v: (registry.folder(v) / "manifest.json").stat().st_mtime)
    return {"version": f"{version} (not promoted)", "folder": registry.folder(version),
            "manifest": _verified(registry, version)}


def _verified(registry, version: str):
    manifest = registry.manifest(version)
    for name in manifest.files:
        registry.verified_file(version, name)  # every file matches its manifest hash before anything loads it
    return manifest


RANDOM_FP32 = "screennet-fp32.onnx"  # the random-weight run's ScreenNet, which the levers and the screen lake reuse


def prepare(work: Path, lake: Path, quick: bool) -> tuple[list[dict], dict]:
    """Export the baselines, find the optimized model, write the pixels; returns the configurations and context."""
    import torch

    from models.export import export_onnx
    from models.nets import macs_per_image
    from models.quantize import quantize_int8
    from tasks.samples import generate
    from models.nets import build_model

    context: dict = {"quality": False}
    pixels = generate(256 if quick else 1024, 0.1, 123, "a", "bench")[0][:, None]
    np.save(work / "pixels.npy", pixels)

    torch.manual_seed(0)
    baseline = build_model("resnet18", 1).eval()
    native = build_model("resnet18-native", 1).eval()
    export_onnx(baseline, work / "baseline.onnx")
    export_onnx(native, work / "resnet18-native.onnx")
    mflops = {"resnet18": 2 * macs_per_image(baseline) / 1e6, "resnet18-native": 2 * macs_per_image(native) / 1e6}

    shipped = None if quick else latest_model(lake)
    if shipped:
        folder, manifest = shipped["folder"], shipped["manifest"]
        arch = manifest.architecture
        checkpoint = str(folder / "model.pt")
        files = {name: folder / file for name, file in
                 {c["name"]: c["file"] for c in manifest.candidates}.items()}
        gates = manifest.gates
        context.update(quality=True, version=shipped["version"], ships=manifest.shipping.candidate,
                       width=arch["width"], stem=arch.get("stem", "conv3s2"), depth=arch.get("depth", 1.0), rule={"name": gates.get("threshold_rule", "quantile"),
                                                  "target": gates["target_sensitivity"],
                                                  "delta": gates.get("delta", 0.05),
                                                  "margin": gates.get("calibration_margin", 0.01)})
        ships = manifest.shipping.candidate
        context["ship_graph"] = {"file": str(files[ships]), "candidate": ships, "engine": manifest.shipping.engine,
                                 "precision": manifest.shipping.precision}
        files = {name: file for name, file in files.items() if not name.startswith(("ov-", "trt-"))}  # the graphs
        _write_split(lake, manifest, work)
        model = build_model(arch["name"], 1, arch["width"], arch.get("pool", "avg"),
                            arch.get("stem", "conv3s2"), arch.get("depth", 1.0))
    else:
        from tasks.train import TrainSettings

        width = TrainSettings().width
        model = build_model("screennet", 1, **TrainSettings().shape()).eval()
        checkpoint = None
        fp32 = export_onnx(model, work / RANDOM_FP32)
        calibration = generate(128, 0.1, 5, "b", "calibration")[0][:, None]
        files = {"fp32": fp32}
        variants = (("u8s8", False),) if quick else (("u8s8", False), ("u8s8", True), ("s8s8", False), ("s8s8", True))
        for fmt, per_channel in variants:
            name = f"int8-{fmt}-{'per-channel' if per_channel else 'per-tensor'}"
            files[name] = quantize_int8(fp32, work / f"screennet-{name}.onnx", calibration, fmt, per_channel)
        context.update(version="random weights (no promoted model in the lake)", width=width,
                       stem=TrainSettings().stem, depth=TrainSettings().depth,
                       screen_graph={"file": str(files["int8-u8s8-per-tensor"]), "precision": "int8",
                                     "candidate": "int8-u8s8-per-tensor (random weights)", "engine": "onnxruntime"})
    mflops["screennet"] = 2 * macs_per_image(model) / 1e6

    big = 8 if quick else 512
    configs = [
        {"name": "baseline-torch", "label": "seed baseline: ResNet18 64→224, torch eager FP32", "runtime": "torch",
         "arch": "resnet18", "max_batch": 2 if quick else 32, "mflops": mflops["resnet18"], "reference": True},
        {"name": "baseline-ort", "label": "seed baseline, ONNX Runtime FP32", "runtime": "onnxruntime",
         "onnx": str(work / "baseline.onnx"), "max_batch": 2 if quick else 64, "mflops": mflops["resnet18"]},
        {"name": "resnet18-native-ort", "label": "ResNet18 at native 64, ONNX Runtime FP32", "runtime": "onnxruntime",
         "onnx": str(work / "resnet18-native.onnx"), "max_batch": 4 if quick else 256,
         "mflops": mflops["resnet18-native"]},
        {"name": "screennet-torch", "label": "ScreenNet, torch eager FP32", "runtime": "torch", "arch": "screennet",
         "width": context["width"], "stem": context["stem"], "depth": context["depth"], "checkpoint": checkpoint, "max_batch": big,
         "mflops": mflops["screennet"], "scored": True},
    ]
    from models.quantize import uint8_input

    for name, file in list(files.items()):  # the uint8 path: the first convolution reads the pixels (issue 18.2)
        if name.startswith("int8") and (not quick or name == "int8-u8s8-per-tensor"):
            files[f"{name}-uint8-input"] = uint8_input(file, work / f"screennet-{name}-uint8-input.onnx")
    for name, file in files.items():
        precision = "fp32" if name == "fp32" else "int8"
        configs.append({"name": f"screennet-ort-{name}", "label": f"ScreenNet, ONNX Runtime {name.upper()}",
                        "runtime": "onnxruntime", "onnx": str(file), "precision": precision, "max_batch": big,
                        "mflops": mflops["screennet"], "scored": True})
    from models.engine import openvino_missing

    if (why := openvino_missing()) is None:
        for name, file in files.items():
            if quick and name != "int8-u8s8-per-tensor":  # the smoke run: one graph is enough to show it runs
                continue
            configs.append({"name": f"screennet-openvino-{name}", "label": f"ScreenNet, OpenVINO {name.upper()}",
                            "runtime": "openvino", "onnx": str(file), "precision": "fp32" if name == "fp32" else "int8",
                            "max_batch": big, "mflops": mflops["screennet"], "scored": True})
    else:
        context["openvino"] = f"not measured: {why}"
    from models import tensorrt

    why_not = tensorrt.missing()
    if why_not is None:
        graphs = {"fp32": files["fp32"], "fp16": tensorrt.fp16_graph(files["fp32"], work / "screennet-trt-fp16.onnx"),
                  "int8": tensorrt.int8_graph(files["fp32"], work / "screennet-trt-int8.onnx", pixels[:256])}
        for precision, file in graphs.items():
            configs.append({"name": f"screennet-tensorrt-{precision}", "label": f"ScreenNet, TensorRT {precision.upper()}",
                            "runtime": "tensorrt", "onnx": str(file), "precision": precision, "max_batch": big,
                            "mflops": mflops["screennet"], "scored": True})
    else:
        context["tensorrt"] = f"not measured: {why_not}"
    return configs, context


def _write_split(lake: Path, manifest, work: Path) -> None:
    from tasks.dataset import load_split, split_of_version
    from tasks.lake import Lake

    ref = split_of_version(Lake(lake), manifest.data)
    for split in ("val", "test"):
        x, y = load_split(ref, split)
        np.save(work / f"{split}.npy", x)
        np.save(work / f"{split}-labels.npy", y)


# --- measuring -----------------------------------------------------------------------------------------------------


def run_config(config: dict, work: Path, threads: int, quick: bool) -> dict:
    """Measure one configuration in a fresh process, then its engine memory in another."""
    spec = {**config, "threads": threads, "pixels": str(work / "pixels.npy"),
            "seconds_per_point": 0.05 if quick else 0.5, "latency_seconds": 0.1 if quick else 3.0,
            "latency_min_runs": 5 if quick else 200, "out": str(work / f"{config['name']}.json")}
    if config.get("scored") and (work / "val.npy").exists():
        spec.update(val=str(work / "val.npy"), test=str(work / "test.npy"))
    if config["name"] == "baseline-torch" and not quick:
        spec.update(latency_seconds=5.0, latency_min_runs=50)
    try:
        result = {**config, **_bench_one(spec, work / f"{config['name']}.config.json", threads)}
        result["rss_mb_with_sweep"] = result["rss_mb"]
        if quick:  # the smoke run: the sweep's own process figures, no second process a configuration
            return result
        # The sweep's big batches and the quality scoring grow the allocator's arenas: engine memory is measured
        # again in a process that only creates the engine and runs it at the knee.
        memory = {key: value for key, value in spec.items() if key not in ("val", "test")}
        memory.update(memory_at_batch=result["knee"]["batch"], out=str(work / f"{config['name']}-memory.json"))
        result["rss_mb"] = _bench_one(memory, work / f"{config['name']}-memory.config.json", threads)
    except RuntimeError as e:
        return {**config, "error": str(e)}
    return result


def _bench_one(spec: dict, path: Path, threads: int) -> dict:
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_one", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError((done.stderr or done.stdout)[-1500:])
    return json.loads(Path(spec["out"]).read_text())


def run_levers(lake: Path, work: Path, threads: int, quick: bool) -> dict:
    """benchmarks.levers in a fresh process: each speed lever against the engine as it ships."""
    out = work / "levers.json"
    command = [sys.executable, "-m", "benchmarks.levers", "--lake", str(lake), "--threads", str(threads),
               "--out", str(out)] + (["--quick"] if quick else [])
    if (random_fp32 := work / RANDOM_FP32).exists():  # a random-weight run: its net, not another export
        command += ["--fp32", str(random_fp32)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        return {"error": (done.stderr or done.stdout)[-1500:]}
    return json.loads(out.read_text())


def machine_peak(threads: int, quick: bool) -> dict:
    """This machine's FP32 GEMM throughput (GFLOP/s) with `threads` threads, measured in a fresh process."""
    n = 512 if quick else 2048
    code = (
        "import time, torch; torch.set_num_threads(%d); n=%d; a=torch.randn(n,n); b=torch.randn(n,n); a@b;"
        "best=min((lambda t:(a@b, time.perf_counter()-t)[1])(time.perf_counter()) for _ in range(%d));"
        "print(2*n**3/best/1e9)" % (threads, n, 3 if quick else 10)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {"fp32_gemm_gflops": float(out.strip()), "gemm_n": n, "threads": threads}


def knee_stability(graph: dict | None, pixels: np.ndarray, threads: int, quick: bool, repeats: int = 5) -> dict:
    """The shipped graph's knee found `repeats` times in a row, as optimize and screen find it (find_knee): how far
    it moves between runs on this host, and each run's largest point spread."""
    from models.engine import OpenVinoEngine, OrtEngine, find_knee

    if graph is None:
        return {"skipped": "no shipped graph (random-weight run)"}
    kind = OpenVinoEngine if graph.get("engine") == "openvino" else OrtEngine
    engine = kind(Path(graph["file"]), graph["precision"], threads)
    runs = [find_knee(engine, pixels, **({"max_batch": 8, "seconds_per_point": 0.03} if quick else {}))
            for _ in range(2 if quick else repeats)]
    knees = [k.batch for k in runs]
    return {"engine": graph.get("engine", "onnxruntime"), "candidate": graph["candidate"], "knees": knees,
            "images_per_s": [round(k.images_per_s) for k in runs],
            "batch1_ms": [round(k.batch1_latency_ms, 3) for k in runs],
            "largest_spread": [round(max(p.spread for p in k.sweep), 3) for k in runs],
            "factor": max(knees) / min(knees)}


def ranking_in_turns(results: list[dict], pixels: np.ndarray, threads: int, quick: bool) -> dict:
    """The ScreenNet engines within RUNOFF_MARGIN of the fastest row measured again in turns, each at its own knee,
    as optimize's run-off measures its candidates (models/engine.runoff): each row above ran in its own process
    minutes from the others, and on a noisy host their order is not a ranking."""
    from benchmarks.bench_one import make_engine
    from models.engine import RUNOFF_MARGIN, RUNOFF_ROUNDS, close_to_fastest, runoff

    rows = [r for r in results if "error" not in r and r["name"].startswith("screennet-") and r.get("onnx")
            and r["runtime"] in ("onnxruntime", "openvino")]
    if not rows:
        return {"skipped": "no ScreenNet engine measured"}
    close = close_to_fastest(rows, lambda r: r["knee"]["images_per_s"])
    if len(close) < 2:
        return {"skipped": "one engine within the margin of the fastest: nothing to rank"}
    contenders = {r["label"]: (make_engine({**r, "threads": threads}, r["knee"]["batch"]),
                               np.resize(pixels, (r["knee"]["batch"], *pixels.shape[1:]))) for r in close}
    measured = runoff(contenders, 0.02 if quick else 0.2, 3 if quick else RUNOFF_ROUNDS)
    ranked = sorted(measured.items(), key=lambda item: -item[1]["share"])
    return {"margin": RUNOFF_MARGIN, "rows": [{"label": label, "knee": next(r["knee"]["batch"] for r in close
                                                                            if r["label"] == label), **figures}
                                              for label, figures in ranked]}


def operator_profiles(results: list[dict], ship: dict | None, threads: int, quick: bool) -> list[dict]:
    """Where the time goes (benchmarks/profile.py) for the fastest ScreenNet engine measured and for the one that
    ships, each at its own knee batch."""
    from benchmarks.profile import profile

    measured = [r for r in results if "error" not in r and r.get("onnx") and r["runtime"] in ("onnxruntime",
                                                                                            "openvino")]
    chosen = []
    if measured:
        fastest = max(measured, key=lambda r: r["knee"]["images_per_s"])
        chosen.append((f"fastest: {fastest['label']}", fastest["onnx"], fastest["runtime"], fastest["knee"]["batch"]))
    if ship is not None:
        same = next((r for r in measured if r["onnx"] == ship["file"] and r["runtime"] == ship["engine"]), None)
        batch = same["knee"]["batch"] if same else 32
        if not chosen or chosen[0][1:3] != (ship["file"], ship["engine"]):
            chosen.append((f"ships: {ship['engine']} {ship['candidate']}", ship["file"], ship["engine"], batch))
    out = []
    for label, file, engine, batch in chosen:
        try:
            out.append({"label": label, **profile(Path(file), engine, batch, 5 if quick else 100, threads)})
        except Exception as e:  # a profiler that fails says so in the report; the measurements stand
            out.append({"label": label, "error": f"{type(e).__name__}: {e}"})
    return out


def int8_peak(threads: int, quick: bool) -> dict:
    """This machine's INT8 GEMM throughput (G integer ops/s, a multiply-add counted as 2): ONNX Runtime's
    MatMulInteger, u8 × s8 → s32 (the VNNI kernel where the CPU has one), n×n×n, the best of several runs. The
    reference for an INT8 engine's GOP/s, as the FP32 GEMM peak is for FP32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = 256 if quick else 2048
    weights = np.random.default_rng(0).integers(-128, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8-peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])], [numpy_helper.from_array(weights, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)
    session.run(None, {"a": a})
    best = float("inf")
    for _ in range(3 if quick else 10):
        t = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - t)
    return {"int8_gemm_gops": 2 * n ** 3 / best / 1e9, "int8_gemm_n": n}


def add_quality(result: dict, work: Path, rule: dict) -> None:
    """Held-out AUC and sensitivity at the threshold this engine calibrates on validation (the model's rule)."""
    from tasks.metrics import auc, table_at
    from tasks.thresholds import ThresholdRule, calibrate

    val_scores = work / f"{result['name']}-val-scores.npy"
    if not val_scores.exists():
        return
    y_val, y_test = np.load(work / "val-labels.npy"), np.load(work / "test-labels.npy")
    s_val, s_test = np.load(val_scores), np.load(work / f"{result['name']}-test-scores.npy")
    threshold = calibrate(s_val, y_val, ThresholdRule(**rule)).threshold
    table = table_at(s_test, y_test, threshold)
    result["quality"] = {"test_auc": auc(s_test, y_test), "threshold": threshold,
                         "test_sensitivity": table.sensitivity, "test_specificity": table.specificity,
                         "test_positives": table.tp + table.fn}


# --- reporting -----------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    ref = next(r for r in report["configs"] if r.get("reference") and "error" not in r)
    rows = ["| configuration | images/s (knee) | × baseline | knee | batch-1 p50 / p95 / p99 ms (threads) | "
            "engine MB | peak RSS MB | MFLOPs/img | G(FL)OP/s (% of its GEMM peak) | test AUC | test sensitivity |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    peak = report["machine"]["fp32_gemm_gflops"]
    for r in report["configs"]:
        if "error" in r:
            rows.append(f"| {r['label']} | failed: {r['error'].splitlines()[-1][:80]} |" + " |" * 9)
            continue
        lat, mem, q = r["latency_ms"], r["rss_mb"], r.get("quality")
        gflops = r["knee"]["images_per_s"] * r["mflops"] / 1000
        # INT8 against the INT8 GEMM peak, FP32 against the FP32 one (an INT8 engine against FP32's read 203%)
        ceiling = report["machine"].get("int8_gemm_gops", peak) if r.get("precision") == "int8" else peak
        rows.append(
            f"| {r['label']} | {r['knee']['images_per_s']:,.0f} | "
            f"{r['knee']['images_per_s'] / ref['knee']['images_per_s']:,.0f}× | {r['knee']['batch']} | "
            f"{lat['p50']:.3f} / {lat['p95']:.3f} / {lat['p99']:.3f} ({lat['threads']}) | "
            f"{mem['engine_growth']:.0f} | "
            f"{mem['peak']:.0f} | {r['mflops']:,.1f} | {gflops:,.1f} ({100 * gflops / ceiling:.0f}%) | "
            + (f"{q['test_auc']:.4f} | {q['test_sensitivity']:.4f} ({q['test_positives']} pos) |" if q else "– | – |"))
    screen = report.get("screen")
    isa = ", ".join(f for f in report["host"]["features"] if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                                  "amx_int8"))
    lines = [f"Benchmarks of {report['date']} on {report['host']['cpu']} ({isa or 'no AVX2'}; "
             f"{report['host']['threads']} threads), "
             f"`{report['command']}`; model {report['context']['version']}"
             + (f", ships {report['context']['ships']}" if report["context"].get("ships") else "") + "; "
             + ", ".join(f"{name} {v}" for name, v in report["host"]["packages"].items()) + ".", "",
             *rows, "",
             f"Machine FP32 GEMM peak (torch, {report['machine']['gemm_n']}³, {report['machine']['threads']} "
             f"threads): {peak:,.0f} GFLOP/s; INT8 GEMM peak (ONNX Runtime MatMulInteger u8×s8, "
             f"{report['machine'].get('int8_gemm_n', '?')}³): {report['machine'].get('int8_gemm_gops', float('nan')):,.0f} GOP/s."]
    if screen:
        lines.append(
            f"End-to-end `screen` flow on {screen['flow']['images']:,} images with {screen['candidate']} "
            f"(Parquet → Parquet, a client of a Prefect server, as deployed): "
            f"{screen['flow']['images_per_s']:,.0f} images/s at batch {screen['flow']['batch']}, peak RSS "
            f"{screen['flow']['peak_rss_mb']:.0f} MB"
            + (f"; as a one-off run on Prefect's ephemeral server: {one_off['images_per_s']:,.0f} images/s, peak RSS "
               f"{one_off['peak_rss_mb']:.0f} MB" if (one_off := screen.get("flow_ephemeral")) else "")
            + f"; the raw engine loop on the same Parquet: {screen['engine']['images_per_s']:,.0f} images/s; "
            f"flow / raw = {screen['flow_vs_engine']:.2f}"
            + f"; of a flow run's time, Prefect's teardown after the run completed (its heartbeat thread's join) "
            f"{screen['flow']['teardown_s']:.2f} s (runs {screen['flow']['teardowns_s']})"
            + (f" (medians of {len(screen['flow']['runs'])} runs each, in turns: [images/s, MB] "
               + "; ".join(f"{what} {screen[what]['runs']}" for what in ("flow", "flow_ephemeral", "engine")
                           if what in screen) + ")" if "runs" in screen["flow"] else "") + ".")
    from benchmarks.profile import markdown as profile_markdown

    for prof in report.get("profiles") or []:
        lines += ["", *(profile_markdown(prof, prof["label"]) if "error" not in prof
                        else [f"Profile of {prof['label']}: failed: {prof['error'][:200]}"])]
    stability = report.get("knee_stability") or {}
    if "knees" in stability:
        lines.append(
            f"Knee stability ({stability['engine']} {stability['candidate']}, find_knee {len(stability['knees'])} "
            f"times in a row): knees {stability['knees']} (largest / smallest {stability['factor']:g}×), images/s "
            f"{stability['images_per_s']}, batch-1 ms {stability['batch1_ms']}, each run's largest point spread "
            f"{stability['largest_spread']}.")
    ranking = report.get("in_turns") or {}
    if "rows" in ranking:
        lines += ["", f"The engines within {ranking['margin']:.0%} of the fastest row, measured again in turns "
                      f"(optimize's run-off, models/engine.runoff: {ranking['rows'][0]['rounds']} rounds of one window "
                      f"each at its knee, each window against its round's fastest):", "",
                  "| engine | knee | images/s (median) | share of the fastest (median) | spread |",
                  "|---|---|---|---|---|"]
        lines += [f"| {row['label']} | {row['knee']} | {row['images_per_s']:,.0f} | {row['share']:.3f} | "
                  f"{row['spread']:.3f} |" for row in ranking["rows"]]
    levers = report.get("levers") or {}
    if "error" in levers:
        lines += ["", f"Levers: failed: {levers['error'].splitlines()[-1][:200]}"]
    elif levers:
        lines += ["", f"Levers, one at a time ({levers['source']}, width {levers['width']}, {levers['threads']} "
                      f"threads; `python -m benchmarks.levers`):", "",
                  "| lever | images/s (best batch) | batch-1 p50 ms |", "|---|---|---|"]
        for lever in levers["levers"]:
            if "images_per_s" in lever:
                p50 = f"{lever['batch1_p50_ms']:.3f}" if "batch1_p50_ms" in lever else "–"
                turns = (f"; {lever['of_default']:.2f}× the default shape's in the same rounds"
                         if "of_default" in lever else "")
                lines.append(f"| {lever['lever']} | {lever['images_per_s']:,.0f} ({lever['batch']}{turns}) | {p50} |")
            else:
                lines.append(f"| {lever['lever']} | session load {lever['load_s'] * 1000:.0f} ms (from the original "
                             f"graph {lever['load_s_from_original'] * 1000:.0f} ms) | – |")
    if report["context"].get("openvino"):
        lines.append(f"OpenVINO: {report['context']['openvino']}.")
    if report["context"].get("tensorrt"):
        lines.append(f"TensorRT: {report['context']['tensorrt']}.")
    return "\n".join(lines) + "\n"


def sweep_plot(report: dict, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    tput, lat = fig.subplots(1, 2)
    colours = colormaps["tab20"].colors
    for i, r in enumerate(r for r in report["configs"] if "error" not in r):
        batches = [p["batch"] for p in r["sweep"]]
        line = tput.plot(batches, [p["images_per_s"] for p in r["sweep"]], marker=".", label=r["name"],
                         color=colours[i % len(colours)])[0]
        tput.plot(r["knee"]["batch"], r["knee"]["images_per_s"], "o", ms=9, mfc="none", color=line.get_color())
        lat.plot(batches, [p["ms_per_batch"] for p in r["sweep"]], marker=".", color=line.get_color())
    for ax in (tput, lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    tput.set(ylabel="images/s", title="throughput vs batch (circle: knee, 95% of peak)")
    lat.set(ylabel="ms per batch", title="latency vs batch")
    tput.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default=os.environ.get("SCREENLINE_LAKE", "lake"),
                        help="the lake whose promoted model is measured (default: $SCREENLINE_LAKE or ./lake)")
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, tiny sweeps, no quality")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--screen-n", type=int,
                        help="images in the end-to-end screen lake (default 100000; quick 2000)")
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = {"cpu": cpu_model(), "features": cpu_features(), "threads": args.threads, "hostname": socket.gethostname(),
            "python": platform.python_version(), "packages": package_versions()}
    with tempfile.TemporaryDirectory(prefix="screenline-bench-") as tmp:
        work = Path(tmp)
        lake = Path(args.lake).resolve()
        if not args.quick and not latest_model(lake):
            log(f"no model in {lake} (`make demo` builds the full one): building a smaller one to measure")
            lake = fallback_lake()
        configs, context = prepare(work, lake, args.quick)
        if args.only:
            keep = set(args.only.split(","))
            configs = [c for c in configs if c["name"] in keep or c.get("reference")]
        machine = {**machine_peak(args.threads, args.quick), **int8_peak(args.threads, args.quick)}
        log(f"FP32 GEMM peak: {machine['fp32_gemm_gflops']:,.0f} GFLOP/s; INT8 GEMM peak (ONNX Runtime "
            f"MatMulInteger): {machine['int8_gemm_gops']:,.0f} GOP/s")
        results = []
        for config in configs:
            t = time.perf_counter()
            result = run_config(config, work, args.threads, args.quick)
            result["seconds"] = time.perf_counter() - t
            if context["quality"]:
                add_quality(result, work, context["rule"])
            results.append(result)
            if "error" in result:
                log(f"{config['name']}: FAILED\n{result['error']}")
            else:
                q = result.get("quality")
                log(f"{config['name']}: {result['knee']['images_per_s']:,.0f} images/s at batch "
                    f"{result['knee']['batch']}, batch-1 p50 {result['latency_ms']['p50']:.3f} ms "
                    f"({result['latency_ms']['threads']} thread(s)), engine "
                    f"{result['rss_mb']['engine_growth']:.0f} MB"
                    + (f", test AUC {q['test_auc']:.4f} sensitivity {q['test_sensitivity']:.4f}" if q else "")
                    + f" ({result['seconds']:.0f} s)")
        profiles = operator_profiles(results, context.get("ship_graph"), args.threads, args.quick)
        stability = knee_stability(context.get("ship_graph"), np.load(work / "pixels.npy"), args.threads,
                                   args.quick)
        log(f"knee stability: {stability}")
        ranking = ranking_in_turns(results, np.load(work / "pixels.npy"), args.threads, args.quick)
        log(f"in turns: {ranking}")
        from benchmarks.screen_throughput import run as screen_run

        n = args.screen_n or (2000 if args.quick else 100_000)
        screen = screen_run(n, 1 if args.quick else 10, log=log,
                            graph=context.get("ship_graph") or context.get("screen_graph"),
                            repeats=1 if args.quick else 3, one_off=not args.quick)
        levers = run_levers(lake, work, args.threads, args.quick)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = "make bench-quick" if args.quick else "make bench"
    report = {"date": date, "host": host, "command": command, "context": context, "machine": machine,
              "configs": results, "profiles": profiles, "knee_stability": stability, "in_turns": ranking,
              "screen": screen, "levers": levers, "seconds": time.perf_counter() - started}
    stem = out / f"{date}-{host['hostname']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    sweep_plot(report, stem.with_name(stem.name + "-sweep.png"))
    print("\n" + markdown(report))
    log(f"wrote {stem}.json, {stem}.md, {stem}-sweep.png in {report['seconds'] / 60:.1f} min")
    failed = ([r["name"] for r in results if "error" in r] + (["levers"] if "error" in levers else [])
              + [p["label"] for p in profiles if "error" in p])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
