"""Where an engine's time goes: a per-operator profile of one graph at one batch size, on ONNX Runtime or OpenVINO.

    python -m benchmarks.profile MODEL.onnx [--engine onnxruntime|openvino] [--batch 32] [--runs 50]

Each engine's own profiler (ONNX Runtime's `enable_profiling` trace, OpenVINO's `PERF_COUNT` counters) times every
kernel it ran; the kernels are grouped by what they compute, as the net is built (models/nets.py): the 1×1
convolutions (expand and project), the depthwise 3×3s, the stem, the rest (pooling, the float head, the input's
cast and normalisation, quantize/dequantize where the engine did not fuse them). Times are per batch: each group's
median over `runs` runs after a warm-up; shares are of their sum (a profiler's own overhead makes it a little larger
than a plain run's time). `make bench` profiles the fastest configuration and the shipped one.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from models.contract import IMAGE_SIZE


def _is_conv(op: str) -> bool:
    """Conv, QLinearConv, FusedConv, ConvInteger (ONNX Runtime); Convolution, GroupConvolution (OpenVINO)."""
    return "Conv" in op and "Convert" not in op


def conv_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """Each Conv-like node's kind by name: "stem" (reads the input), "depthwise", "1×1", or "k×k"."""
    kinds, inputs = {}, {i.name for i in model.graph.input}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if not _is_conv(node.op_type):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", []))
        group = int(attrs.get("group", 1))
        first = _reads_input(producers, node, inputs)
        kinds[node.name] = ("stem" if first else "depthwise" if group > 1
                            else "1×1" if kernel == [1, 1] else f"{'×'.join(map(str, kernel)) or 'k×k'}")
    return kinds


def _reads_input(producers: dict[str, onnx.NodeProto], node: onnx.NodeProto, inputs: set[str]) -> bool:
    """Whether `node`'s data input comes from the graph input without passing another convolution (through the
    cast, the normalisation, quantize/dequantize); `producers` maps each tensor to the node that writes it."""
    seen, todo = set(), [node.input[0]]
    while todo:
        name = todo.pop()
        if name in inputs:
            return True
        producer = producers.get(name)
        if name in seen or producer is None or _is_conv(producer.op_type):
            continue
        seen.add(name)
        todo.extend(producer.input)
    return False


def _group(op: str, kind: str | None) -> str:
    if kind is not None:
        return f"conv {kind}"
    if _is_conv(op):
        return "conv (other)"
    return op


def ort_profile(model_path: Path, batch: int, runs: int, threads: int) -> dict[str, float]:
    """Microseconds a batch by group, from ONNX Runtime's trace of `runs` runs (the optimized graph names the
    fused nodes; its Conv attributes say which kind each is)."""
    import onnxruntime as ort

    def options(**extra) -> ort.SessionOptions:
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in extra.items():
            setattr(o, key, value)
        return o

    with tempfile.TemporaryDirectory(prefix="screenline-profile-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"  # the graph ORT runs: its node names are the trace's
        ort.InferenceSession(str(model_path), options(optimized_model_filepath=str(optimized)),
                             providers=["CPUExecutionProvider"])
        kinds = conv_kinds(onnx.load(str(optimized)))
        session = ort.InferenceSession(str(model_path), options(enable_profiling=True,
                                                                profile_file_prefix=str(Path(tmp) / "trace")),
                                       providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape
        x = np.random.default_rng(0).integers(0, 256, (batch, int(shape[1]), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        name = session.get_inputs()[0].name
        session.run(None, {name: x})  # warm-up, not counted below
        for _ in range(runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]  # [0]: the warm-up
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in spans]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (start, end) in enumerate(spans) if start <= event["ts"] <= end), None)
        if run is not None:
            node = event["name"][: -len("_kernel_time")]
            per_run[run][_group(event["args"].get("op_name", "?"), kinds.get(node))] += float(event["dur"])
    return _medians(per_run)


def _medians(per_run: list[dict[str, float]]) -> dict[str, float]:
    """Each group's median over the runs (a neighbour's burst during one run is not where the time goes)."""
    groups = {k for run in per_run for k in run}
    return {k: float(np.median([run.get(k, 0.0) for run in per_run])) for k in groups}


def openvino_profile(model_path: Path, batch: int, runs: int, threads: int) -> dict[str, float]:
    """Microseconds a batch by group, from OpenVINO's per-node counters (each group's median over `runs` runs); a
    node's kind comes from its original ONNX name where OpenVINO kept it, else from its implementation's name."""
    import openvino as ov

    kinds = conv_kinds(onnx.load(str(model_path)))
    core = ov.Core()
    model = core.read_model(str(model_path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERF_COUNT": True})
    channels = int(model.inputs[0].get_partial_shape()[1].get_length())
    x = np.random.default_rng(0).integers(0, 256, (batch, channels, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    request = compiled.create_infer_request()
    request.infer({0: x})
    per_run: list[dict[str, float]] = []
    for _ in range(runs):
        request.infer({0: x})
        totals: dict[str, float] = defaultdict(float)
        per_run.append(totals)
        for info in request.profiling_info:
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            us = info.real_time.total_seconds() * 1e6
            if us <= 0:
                continue
            kind = _ov_kind(info.node_name, info.node_type, info.exec_type, kinds)
            totals[kind] += us
    return _medians(per_run)


def _ov_kind(node_name: str, node_type: str, exec_type: str, kinds: dict[str, str]) -> str:
    if not _is_conv(node_type):
        # a reference (unoptimized) kernel is worth seeing: e.g. the input's uint8 Convert
        return f"{node_type} (reference kernel)" if exec_type.startswith("ref") else node_type
    for name in re.split(r"[,\s/]+", node_name):  # "node_conv2d_3/WithoutBiases"; fused nodes list their parts
        if name in kinds:
            return f"conv {kinds[name]}"
    return "conv depthwise" if "dw" in exec_type else "conv (other)"


def profile(model_path: Path, engine: str = "onnxruntime", batch: int = 32, runs: int = 50,
            threads: int = 2) -> dict:
    """The profile as a table: rows of (group, µs a batch, share), largest first, and their total."""
    measure = openvino_profile if engine == "openvino" else ort_profile
    totals = measure(Path(model_path), batch, runs, threads)
    total = sum(totals.values())
    rows = sorted(([k, round(v, 1), round(v / total, 4)] for k, v in totals.items()), key=lambda r: -r[1])
    return {"engine": engine, "file": str(model_path), "batch": batch, "runs": runs, "threads": threads,
            "total_us": round(total, 1), "us_per_image": round(total / batch, 3), "rows": rows}


def markdown(result: dict, label: str) -> list[str]:
    lines = [f"Where the time goes ({label}, {result['engine']} profiler, batch {result['batch']}, medians of "
             f"{result['runs']} runs; {result['us_per_image']:.1f} µs an image profiled):", "",
             "| operator group | µs a batch | share |", "|---|---|---|"]
    lines += [f"| {name} | {us:,.1f} | {100 * share:.1f}% |" for name, us, share in result["rows"]]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = profile(Path(args.model), args.engine, args.batch, args.runs, args.threads)
    print("\n".join(markdown(result, Path(args.model).name)))


if __name__ == "__main__":
    main()
