"""Engines: uint8 N×C×64×64 in, float32 probabilities out. ONNX Runtime on the CPU is the default everywhere.

`Engine` is the small interface every backend implements: ONNX Runtime here, OpenVINO (benchmarks only), TensorRT
on GPUs (`models.tensorrt`). Sessions are expensive to create and safe to call from several threads, so a process
creates one per model file and shares it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models.contract import IMAGE_SIZE, INPUT_NAME


class Engine(Protocol):
    """What screening needs from a model: scores for a uint8 batch."""

    name: str
    precision: str

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """float32 probabilities (N,) for uint8 pixels (N, C, 64, 64)."""
        ...


ENGINES = ("auto", "onnxruntime", "tensorrt")
"""What a user may ask for: auto picks TensorRT where a GPU and the `gpu` extra are present, else ONNX Runtime."""


def resolve_engine(requested: str = "auto") -> str:
    """The engine to use for `requested` on this host; engine=tensorrt without a GPU fails with one clear line."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested == "onnxruntime":
        return requested
    from models import tensorrt

    if requested == "tensorrt":
        tensorrt.require()
        return requested
    return "tensorrt" if tensorrt.missing() is None else "onnxruntime"


def default_threads() -> int:
    """Intra-op threads: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class OrtEngine:
    """An ONNX Runtime CPU session behind `Engine`.

    Spinning is off: on a shared or busy CPU, spinning threads burn the cores the reader and other shards need.
    """

    name = "onnxruntime"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.precision = precision
        self.threads = options.intra_op_num_threads
        shape = self.session.get_inputs()[0].shape
        self.channels = int(shape[1])

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"engine input must be uint8 N×C×{IMAGE_SIZE}×{IMAGE_SIZE}, got {pixels.dtype} "
                             f"{pixels.shape}")
        return self.session.run(None, {INPUT_NAME: pixels})[0].reshape(-1)


class OpenVinoEngine:
    """OpenVINO on the CPU behind `Engine`, reading the same ONNX graphs (FP32, or INT8 from their Q/DQ nodes).

    Optional (extra `openvino`). Inference precision is pinned to f32 so a CPU with bf16 units does not silently
    score in bf16; one infer request per thread, since a request is not safe to share.
    """

    name = "openvino"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None):
        import threading

        import openvino as ov

        self.threads = threads or default_threads()
        core = ov.Core()
        model = core.read_model(str(model_path))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        })
        self.precision = precision
        self.channels = int(model.inputs[0].get_partial_shape()[1].get_length())
        self._local = threading.local()

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"engine input must be uint8 N×C×{IMAGE_SIZE}×{IMAGE_SIZE}, got {pixels.dtype} "
                             f"{pixels.shape}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return np.array(request.infer({0: pixels})[0], dtype=np.float32).reshape(-1)


def scores(engine: Engine, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Scores for any number of images, in batches."""
    out = [engine.infer(np.ascontiguousarray(pixels[i: i + batch])) for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@dataclass
class KneePoint:
    batch: int
    images_per_s: float
    ms_per_batch: float


@dataclass
class Knee:
    """A batch-size sweep and its knee: the smallest batch reaching `fraction` of the peak throughput."""

    batch: int
    images_per_s: float
    batch1_latency_ms: float
    sweep: list[KneePoint]

    def as_dict(self) -> dict:
        return {"batch": self.batch, "images_per_s": round(self.images_per_s, 1),
                "batch1_latency_ms": round(self.batch1_latency_ms, 4),
                "sweep": [[p.batch, round(p.images_per_s, 1), round(p.ms_per_batch, 4)] for p in self.sweep]}


def _throughput(engine: Engine, pixels: np.ndarray, batch: int, seconds: float) -> KneePoint:
    x = np.ascontiguousarray(pixels[:batch]) if len(pixels) >= batch else np.resize(pixels, (batch, *pixels.shape[1:]))
    engine.infer(x)  # warm-up
    runs, t0 = 0, time.perf_counter()
    best = float("inf")
    while True:
        t = time.perf_counter()
        engine.infer(x)
        best = min(best, time.perf_counter() - t)
        runs += 1
        if time.perf_counter() - t0 >= seconds and runs >= 3:
            break
    # the best of several runs: the engine's speed, not the neighbours' noise on a shared machine
    return KneePoint(batch, batch / best, best * 1000)


MAX_BATCH = 512
"""The top of the knee sweep (extended past it while throughput still grows, up to find_knee's `limit`)."""


def find_knee(engine: Engine, pixels: np.ndarray, max_batch: int = MAX_BATCH, fraction: float = 0.95,
              seconds_per_point: float = 0.3, limit: int = 4096) -> Knee:
    """Sweep batch sizes 1…max_batch (powers of two) and take the smallest reaching `fraction` of the peak.

    If the peak is at the top of the sweep, the sweep extends (up to `limit`) until throughput stops growing. An
    engine with a largest batch of its own (a TensorRT plan's `max_batch`) is never swept past it.
    """
    if (largest := getattr(engine, "max_batch", None)) is not None:
        max_batch, limit = min(max_batch, largest), min(limit, largest)
    sweep: list[KneePoint] = []
    batch = 1
    while batch <= max_batch or (sweep and sweep[-1].images_per_s == max(p.images_per_s for p in sweep)
                                  and batch <= limit):
        sweep.append(_throughput(engine, pixels, batch, seconds_per_point))
        batch *= 2
    peak = max(p.images_per_s for p in sweep)
    knee = next(p for p in sweep if p.images_per_s >= fraction * peak)
    return Knee(knee.batch, knee.images_per_s, sweep[0].ms_per_batch, sweep)
